//! Compute device choice and run-time GPU detection.
