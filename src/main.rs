//! The `kv` binary: `kv serve` (and, later, `kv cli` and `kv bench`).

use clap::{Parser, Subcommand};

/// kv: a key-value store of named buckets.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve => {
            println!("kv: the core is built; the network server arrives with the server issue.");
            Ok(())
        }
    }
}
