//! `wick-harness`: a local RunPod platform on loopback that drives a real `wick` process.
fn main() -> anyhow::Result<()> {
    Ok(())
}
