//! `wick`: the production worker binary.
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = wick::config::Cli::parse();
    cli.config.validate()?;
    Ok(())
}
