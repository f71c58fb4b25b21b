//! wick's shared-state modules, compiled from `../src` by path for the ThreadSanitizer run (see
//! `Cargo.toml`). The module paths mirror the main crate's, so `crate::error::JobError` inside the
//! store and `wick::server::store` in the stress test name the same items as in wick itself.

#[path = "../src/error.rs"]
pub mod error;

/// `wick::server`'s shared state.
#[path = "../src/server"]
pub mod server {
    pub mod admission;
    pub mod store;
}

/// `wick::queue`'s shared state.
#[path = "../src/queue"]
pub mod queue {
    pub mod table;
}
