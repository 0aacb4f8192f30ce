use clap::{CommandFactory, FromArgMatches};

#[tokio::main]
async fn main() {
    return_large_buffers_to_the_os();
    // Run as `kubectl-bitsmith` (a symlink or a copy on the PATH), this is the kubectl plugin `kubectl bitsmith`.
    let plugin = std::env::args_os()
        .next()
        .and_then(|argv0| std::path::Path::new(&argv0).file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|name| name.starts_with("kubectl-bitsmith"));
    let (name, command) = if plugin {
        ("kubectl bitsmith", bitsmith::cli::Cli::command().bin_name("kubectl bitsmith"))
    } else {
        ("bitsmith", bitsmith::cli::Cli::command())
    };
    let cli = bitsmith::cli::Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    bitsmith::telemetry::init(cli.log_json);
    if let Err(line) = bitsmith::cli::run(cli).await {
        eprintln!("{name}: {line}");
        std::process::exit(1);
    }
}

/// Transfer buffers are 1–8 MiB and short-lived. glibc raises its mmap threshold after the first such buffer is
/// freed and from then on keeps them in per-thread arenas, which more than doubled peak RSS in `make bench`
/// (122 MiB instead of 50 MiB for a 1 GiB fetch). A fixed threshold hands them back to the OS when freed.
fn return_large_buffers_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
