//! Certificates for tests, made with openssl: self-signed CAs, and the server and client certificates they issue.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// A certificate and its key, as PEM files.
pub struct Pem {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(args: &[&OsStr]) {
    let out = std::process::Command::new("openssl").args(args).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A new self-signed CA in `dir` (`stem.crt`, `stem.key`) with the common name `cn`, valid for a day.
pub fn ca(dir: &Path, stem: &str, cn: &str) -> Pem {
    let pem = Pem { cert: dir.join(format!("{stem}.crt")), key: dir.join(format!("{stem}.key")) };
    let subject = format!("/CN={cn}");
    let args: [&OsStr; 13] = [
        "req".as_ref(),
        "-x509".as_ref(),
        "-newkey".as_ref(),
        "rsa:2048".as_ref(),
        "-nodes".as_ref(),
        "-days".as_ref(),
        "1".as_ref(),
        "-subj".as_ref(),
        subject.as_ref(),
        "-keyout".as_ref(),
        pem.key.as_os_str(),
        "-out".as_ref(),
        pem.cert.as_os_str(),
    ];
    openssl(&args);
    pem
}

/// A certificate in `dir` (`stem.crt`, `stem.key`) for the common name `cn`, issued by `ca` with `extensions`
/// (the text of an openssl extension file, e.g. `extendedKeyUsage=clientAuth`), valid for a day.
pub fn issue(dir: &Path, ca: &Pem, stem: &str, cn: &str, extensions: &str) -> Pem {
    let pem = Pem { cert: dir.join(format!("{stem}.crt")), key: dir.join(format!("{stem}.key")) };
    let (csr, ext, serial) =
        (dir.join(format!("{stem}.csr")), dir.join(format!("{stem}.cnf")), dir.join(format!("{stem}.srl")));
    std::fs::write(&ext, extensions).unwrap();
    let subject = format!("/CN={cn}");
    let request: [&OsStr; 10] = [
        "req".as_ref(),
        "-newkey".as_ref(),
        "rsa:2048".as_ref(),
        "-nodes".as_ref(),
        "-subj".as_ref(),
        subject.as_ref(),
        "-keyout".as_ref(),
        pem.key.as_os_str(),
        "-out".as_ref(),
        csr.as_os_str(),
    ];
    openssl(&request);
    let sign: [&OsStr; 17] = [
        "x509".as_ref(),
        "-req".as_ref(),
        "-in".as_ref(),
        csr.as_os_str(),
        "-CA".as_ref(),
        ca.cert.as_os_str(),
        "-CAkey".as_ref(),
        ca.key.as_os_str(),
        "-CAserial".as_ref(),
        serial.as_os_str(),
        "-CAcreateserial".as_ref(),
        "-days".as_ref(),
        "1".as_ref(),
        "-extfile".as_ref(),
        ext.as_os_str(),
        "-out".as_ref(),
        pem.cert.as_os_str(),
    ];
    openssl(&sign);
    pem
}
