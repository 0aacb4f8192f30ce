//! Ports for the servers tests and benchmarks start as child processes.

/// A TCP port on 127.0.0.1 that nothing listens on now, for a server the test starts. Chosen at random below the
/// range the kernel takes outgoing connections' ports from (`ip_local_port_range`): a port the kernel picked
/// (`bind` to port 0) is in that range, and a client connection could take it before the server binds it.
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (first, span) = (10_000u16, low.saturating_sub(10_000).max(1));
    for _ in 0..1000 {
        let port = first + (uuid::Uuid::new_v4().as_u128() % u128::from(span)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between {first} and {low}");
}
