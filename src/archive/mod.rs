//! Checks of uploaded archives, made on the bytes as they stream by. Pure: no I/O, tested on bytes in memory.

mod segmented;
pub mod tgz;
pub mod zip;

#[cfg(test)]
mod fuzz;

/// Run a Python `program` with `input` on its standard input (written from another thread, so that a large
/// output cannot block it) and return its standard output; `what` names a failure.
#[cfg(test)]
pub(crate) fn python(program: &str, input: Vec<u8>, what: &str) -> Vec<u8> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("python3")
        .args(["-c", program])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut stdin = child.stdin.take().expect("a pipe");
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("python3 ran");
    writer.join().expect("the writer thread").expect("python3 took its input");
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}
