//! [`ServerSettings`]: what the dev server needs from [`Config`], checked once before binding.

use std::net::IpAddr;
use std::time::Duration;

use crate::config::{Config, Secret};

use super::ServerError;

/// How long a finished job stays readable through `/status` and `/stream` (RunPod keeps `/run`
/// results 30 minutes).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 60);

/// Most finished jobs kept for `/status`; the oldest are evicted first beyond this.
pub const DEFAULT_MAX_FINISHED_JOBS: usize = 1024;

/// Settings of the dev API server.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Bind address (IP or `localhost`).
    pub host: String,
    /// Bind port (0 picks a free one).
    pub port: u16,
    /// With a key, every route but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<Secret>,
    /// Origins that get CORS headers; empty means no CORS headers at all. Never `*`.
    pub cors_origins: Vec<String>,
    /// Largest request body in bytes; larger bodies get 413 before any parsing.
    pub body_limit: usize,
    /// Deadline of one request or job, from admission (queue wait included) to its last token.
    pub request_timeout: Duration,
    /// Requests admitted beyond the running ones before new ones get 429.
    pub max_waiting: usize,
    /// How long finished RunPod jobs stay readable.
    pub retention: Duration,
    /// Most finished RunPod jobs kept (oldest evicted first).
    pub max_finished_jobs: usize,
}

impl ServerSettings {
    /// Builds the settings from the worker configuration and the API key (read by the binary from
    /// `WICK_API_KEY` or `--api-key-file`, never from argv).
    ///
    /// # Errors
    /// [`ServerError::Config`] when the bind address is not loopback and there is no API key, when a
    /// CORS origin is `*` or empty, or when a limit is zero.
    pub fn from_config(config: &Config, api_key: Option<Secret>) -> Result<Self, ServerError> {
        let settings = ServerSettings {
            host: config.host.trim().to_string(),
            port: config.port,
            api_key: api_key.filter(|k| !k.expose().trim().is_empty()),
            cors_origins: config
                .cors_origins
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            body_limit: config.max_request_bytes,
            request_timeout: Duration::from_secs(config.request_timeout_secs),
            max_waiting: config.max_waiting_requests,
            retention: DEFAULT_RETENTION,
            max_finished_jobs: DEFAULT_MAX_FINISHED_JOBS,
        };
        settings.check()?;
        Ok(settings)
    }

    /// Loopback settings with defaults and no key (tests and embedding).
    pub fn for_test() -> Self {
        ServerSettings {
            host: "127.0.0.1".into(),
            port: 0,
            api_key: None,
            cors_origins: Vec::new(),
            body_limit: 10 * 1024 * 1024,
            request_timeout: Duration::from_secs(600),
            max_waiting: 256,
            retention: DEFAULT_RETENTION,
            max_finished_jobs: DEFAULT_MAX_FINISHED_JOBS,
        }
    }

    /// Whether the configured host is a loopback address.
    pub fn host_is_loopback(&self) -> bool {
        is_loopback_host(&self.host)
    }

    /// Checks the settings (also run by [`super::run`] against the actual listener).
    ///
    /// # Errors
    /// [`ServerError::Config`] naming what is wrong.
    pub fn check(&self) -> Result<(), ServerError> {
        if !self.host_is_loopback() && self.api_key.is_none() {
            return Err(ServerError::Config(format!(
                "refusing to bind `{}` without an API key: set WICK_API_KEY or --api-key-file, or bind 127.0.0.1",
                self.host
            )));
        }
        if let Some(origin) = self.cors_origins.iter().find(|o| o.contains('*')) {
            return Err(ServerError::Config(format!(
                "CORS origin `{origin}` is not allowed: list origins explicitly, never `*`"
            )));
        }
        if self.body_limit == 0 {
            return Err(ServerError::Config(
                "`--max-request-bytes` must be > 0".into(),
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(ServerError::Config(
                "`--request-timeout-secs` must be > 0".into(),
            ));
        }
        if self.max_finished_jobs == 0 {
            return Err(ServerError::Config(
                "the finished-job store needs room for at least one job".into(),
            ));
        }
        Ok(())
    }
}

/// `localhost` or a loopback IP (`127.0.0.0/8`, `::1`).
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim().trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_public_bind_without_api_key() {
        let config = Config {
            host: "0.0.0.0".into(),
            ..Config::for_test()
        };
        let err = ServerSettings::from_config(&config, None).unwrap_err();
        assert!(err.to_string().contains("API key"), "{err}");
        let ok = ServerSettings::from_config(&config, Some(Secret::new("k"))).unwrap();
        assert_eq!(ok.host, "0.0.0.0");
    }

    #[test]
    fn refuses_hostname_bind_without_api_key() {
        let config = Config {
            host: "example.internal".into(),
            ..Config::for_test()
        };
        assert!(ServerSettings::from_config(&config, None).is_err());
    }

    #[test]
    fn empty_api_key_counts_as_none() {
        let config = Config {
            host: "0.0.0.0".into(),
            ..Config::for_test()
        };
        assert!(ServerSettings::from_config(&config, Some(Secret::new("  "))).is_err());
    }

    #[test]
    fn loopback_binds_need_no_key() {
        for host in ["127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"] {
            let config = Config {
                host: host.into(),
                ..Config::for_test()
            };
            assert!(ServerSettings::from_config(&config, None).is_ok(), "{host}");
        }
    }

    #[test]
    fn refuses_wildcard_cors_origin() {
        let settings = ServerSettings {
            cors_origins: vec!["https://*.example.com".into()],
            ..ServerSettings::for_test()
        };
        assert!(settings.check().is_err());
    }

    #[test]
    fn settings_debug_hides_the_key() {
        let settings = ServerSettings {
            api_key: Some(Secret::new("canary-key")),
            ..ServerSettings::for_test()
        };
        assert!(!format!("{settings:?}").contains("canary"));
    }
}
