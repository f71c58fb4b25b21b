//! A local RunPod platform on loopback (public API and worker-facing queue) that drives a real `wick` process.
