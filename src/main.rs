use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = bitsmith::cli::Cli::parse();
    bitsmith::telemetry::init(cli.log_json);
    if let Err(line) = bitsmith::cli::run(cli).await {
        eprintln!("bitsmith: {line}");
        std::process::exit(1);
    }
}
