//! Where sources may connect. A Package names its source's host, but the connection is the controller's: from
//! its network position it can reach cloud metadata services, loopback listeners and the cluster's insides,
//! none of which a tenant may read through it.
//!
//! Addresses are checked *after* DNS resolution, inside the resolver every source connection goes through
//! (reqwest's for http, object_store's for object stores), so a name that resolves to a harmless address at
//! validation time and to a metadata address at connect time (rebinding) is still refused. Literal IP hosts
//! never reach a resolver; [`Egress::check_url`] refuses them before any request, and again on every redirect.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Addresses no source may reach unless the installer opens them with `--allow-source-cidr`: this host itself,
/// link-local (where cloud metadata services live), and addresses that are not unicast.
const BUILT_IN_DENIED: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    // Alibaba Cloud's metadata service.
    "100.100.100.200/32",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "fe80::/10",
    // EC2's metadata service over IPv6.
    "fd00:ec2::254/128",
    "ff00::/8",
];

/// Names of cloud metadata services, refused whatever they resolve to.
const METADATA_NAMES: &[&str] =
    &["metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"];

/// Why a source may not connect somewhere.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("{host} is a cloud metadata service, which sources may not reach")]
    MetadataName { host: String },
    #[error("{}", denied_message(host, address, why))]
    DeniedAddress { host: String, address: IpAddr, why: &'static str },
    #[error("cannot resolve {host}: {detail}")]
    Resolve { host: String, detail: String },
}

fn denied_message(host: &str, address: &IpAddr, why: &str) -> String {
    if host.trim_matches(['[', ']']) == address.to_string() {
        format!("{address} {why}")
    } else {
        format!("{host} resolves to {address}, which {why}")
    }
}

/// The installer's choice of which addresses sources may reach, on top of [`BUILT_IN_DENIED`].
#[derive(Clone, Debug)]
pub struct Egress {
    /// `--deny-source-cidr`: refused even when an allowed range holds them.
    denied: Vec<IpNet>,
    /// `--allow-source-cidr`: reachable although built in as denied.
    allowed: Vec<IpNet>,
    built_in: Vec<IpNet>,
}

impl Default for Egress {
    fn default() -> Self {
        Egress::new(Vec::new(), Vec::new())
    }
}

impl Egress {
    pub fn new(allowed: Vec<IpNet>, denied: Vec<IpNet>) -> Self {
        let built_in = BUILT_IN_DENIED.iter().map(|net| net.parse().expect("a valid built-in CIDR")).collect();
        Egress { denied, allowed, built_in }
    }

    /// Whether a source may connect to `address`; `Err` says why not.
    pub fn check_address(&self, address: IpAddr) -> Result<(), &'static str> {
        // An IPv4 address in IPv6 clothing (mapped, NAT64, 6to4) reaches the IPv4 host: judge that one.
        let address = embedded_ipv4(address).map(IpAddr::V4).unwrap_or(address);
        if self.denied.iter().any(|net| net.contains(&address)) {
            return Err("is denied to sources by the installer (--deny-source-cidr)");
        }
        if self.allowed.iter().any(|net| net.contains(&address)) {
            return Ok(());
        }
        if self.built_in.iter().any(|net| net.contains(&address)) {
            return Err(
                "is a loopback, link-local or metadata address, which sources may not reach (--allow-source-cidr opens a range)",
            );
        }
        Ok(())
    }

    /// Refuse a URL whose host is a metadata name or a literal address sources may not reach. Names are
    /// checked again, address by address, when they are resolved.
    pub fn check_url(&self, url: &url::Url) -> Result<(), EgressError> {
        match url.host() {
            Some(url::Host::Domain(name)) => check_name(name),
            Some(url::Host::Ipv4(ip)) => self.check_resolved(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_resolved(&ip.to_string(), IpAddr::V6(ip)),
            None => Ok(()),
        }
    }

    fn check_resolved(&self, host: &str, address: IpAddr) -> Result<(), EgressError> {
        self.check_address(address).map_err(|why| EgressError::DeniedAddress { host: host.to_string(), address, why })
    }

    /// Resolve `host` and refuse it if any of its addresses is denied: a name that mixes a harmless address
    /// with a denied one is not something to try in turn.
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, EgressError> {
        check_name(host)?;
        let resolve_error = |detail: String| EgressError::Resolve { host: host.to_string(), detail };
        let addresses: Vec<IpAddr> = tokio::net::lookup_host((host, 0))
            .await
            .map_err(|e| resolve_error(e.to_string()))?
            .map(|socket| socket.ip())
            .collect();
        if addresses.is_empty() {
            return Err(resolve_error("no addresses".into()));
        }
        for &address in &addresses {
            self.check_resolved(host, address)?;
        }
        Ok(addresses)
    }
}

fn check_name(name: &str) -> Result<(), EgressError> {
    let normalized = name.trim_end_matches('.').to_ascii_lowercase();
    if METADATA_NAMES.contains(&normalized.as_str()) {
        return Err(EgressError::MetadataName { host: name.to_string() });
    }
    Ok(())
}

/// The IPv4 address an IPv6 address forwards to: IPv4-mapped (`::ffff:a.b.c.d`), NAT64 (`64:ff9b::/96`) and
/// 6to4 (`2002::/16`).
fn embedded_ipv4(address: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = address else { return None };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let segments = v6.segments();
    let octets = v6.octets();
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]));
    }
    if segments[0] == 0x2002 {
        return Some(Ipv4Addr::new(octets[2], octets[3], octets[4], octets[5]));
    }
    None
}

/// The resolver of every source connection: [`Egress::resolve`] for reqwest (http sources) and for object_store
/// (object-store sources).
#[derive(Clone, Debug)]
pub struct GuardedResolver(pub Arc<Egress>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addresses = egress.resolve(&host).await?;
            let sockets: Vec<SocketAddr> = addresses.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            Ok(Box::new(sockets.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl object_store::client::DnsResolver for GuardedResolver {
    fn resolve(&self, host: &str) -> object_store::client::DnsFuture {
        let egress = self.0.clone();
        let host = host.to_string();
        Box::pin(async move { Ok(egress.resolve(&host).await?) })
    }
}

/// The first [`EgressError`] among an error's causes: a refusal surfaces from deep inside the http stack.
pub(crate) fn find_refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a EgressError> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(refusal) = e.downcast_ref::<EgressError>() {
            return Some(refusal);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn metadata_link_local_and_loopback_are_refused_by_default() {
        let egress = Egress::default();
        for denied in [
            "169.254.169.254",
            "169.254.170.2",
            "127.0.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(egress.check_address(ip(denied)).is_err(), "{denied} must be refused");
        }
        for allowed in ["93.184.216.34", "10.0.0.5", "2606:4700::1111", "64:ff9b::808:808"] {
            assert!(egress.check_address(ip(allowed)).is_ok(), "{allowed} must be allowed");
        }
    }

    #[test]
    fn installer_ranges_open_and_close_addresses_and_denials_win() {
        let egress = Egress::new(nets(&["127.0.0.0/8"]), nets(&["127.0.0.2/32", "10.0.0.0/8"]));
        assert!(egress.check_address(ip("127.0.0.1")).is_ok());
        assert!(egress.check_address(ip("127.0.0.2")).is_err());
        assert!(egress.check_address(ip("::ffff:127.0.0.2")).is_err());
        assert!(egress.check_address(ip("10.1.2.3")).is_err());
        assert!(egress.check_address(ip("169.254.169.254")).is_err());
    }

    #[test]
    fn urls_with_literal_addresses_or_metadata_names_are_refused() {
        let egress = Egress::default();
        for refused in [
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00:ec2::254]/",
            "http://2852039166/",
            "http://0xa9.0xfe.0xa9.0xfe/",
            "http://metadata.google.internal./computeMetadata/v1/",
            "http://METADATA/",
            "http://[::ffff:a9fe:a9fe]/",
        ] {
            let url = url::Url::parse(refused).unwrap();
            assert!(egress.check_url(&url).is_err(), "{refused} must be refused");
        }
        assert!(egress.check_url(&url::Url::parse("https://artifacts.example.com/a.zip").unwrap()).is_ok());
    }

    #[tokio::test]
    async fn names_are_judged_by_what_they_resolve_to() {
        let closed = Egress::default();
        let err = closed.resolve("localhost").await.unwrap_err();
        assert!(matches!(err, EgressError::DeniedAddress { .. }), "{err}");
        let open = Egress::new(nets(&["127.0.0.0/8", "::1/128"]), Vec::new());
        assert!(open.resolve("localhost").await.unwrap().iter().all(|a| a.is_loopback()));
    }
}
