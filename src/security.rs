//! What a new connection is admitted under: the TLS mode and credentials, and the
//! listener-wide access rules. Loaded at startup and replaced whole by a reload (SIGHUP);
//! each connection takes a snapshot when it is accepted, so a reload never changes the rules
//! of a connection already running.

use std::sync::{Arc, RwLock};

use crate::access::ListenerPolicy;
use crate::config::{Config, KernelTls, TlsMode};
use crate::target::handshake::TlsPolicy;
use crate::tls::{TlsContext, TlsPaths};

/// The admission settings of one generation of the configuration.
#[derive(Debug, Default)]
pub struct Security {
    /// STARTTLS policy of the handshake.
    pub mode: TlsPolicy,
    /// Credentials, when TLS is on or required.
    pub tls: Option<TlsContext>,
    /// Whether established sessions move into the kernel (kTLS) when it can take them.
    pub kernel: KernelTls,
    /// Who may connect at all (checked before the greeting).
    pub listener: ListenerPolicy,
}

impl Security {
    /// Builds the settings of `config`, reading the TLS credential files (all or nothing:
    /// an error names the option and the file).
    pub fn load(config: &Config) -> Result<Security, String> {
        let settings = &config.tls;
        let mode = match settings.mode {
            TlsMode::Off => TlsPolicy::Off,
            TlsMode::On => TlsPolicy::On,
            TlsMode::Require => TlsPolicy::Require,
        };
        let tls = match mode {
            TlsPolicy::Off => None,
            TlsPolicy::On | TlsPolicy::Require => {
                let paths = TlsPaths {
                    cert: settings.cert.clone(),
                    key: settings.key.clone(),
                    ca: settings.ca.clone(),
                    psk: settings.psk.clone(),
                };
                let context = TlsContext::load(&paths).map_err(|error| error.to_string())?;
                tracing::info!(mode = settings.mode.as_str(), credentials = %context.describe(),
                    kernel = settings.kernel.as_str(), "TLS enabled");
                Some(context)
            }
        };
        Ok(Security {
            mode,
            tls,
            kernel: settings.kernel,
            listener: config.listener_policy.clone(),
        })
    }
}

/// The current [`Security`], swapped whole on reload.
#[derive(Debug, Default)]
pub struct SecurityCell(RwLock<Arc<Security>>);

impl SecurityCell {
    /// A cell holding `security`.
    pub fn new(security: Security) -> SecurityCell {
        SecurityCell(RwLock::new(Arc::new(security)))
    }

    /// The settings new connections get.
    pub fn current(&self) -> Arc<Security> {
        self.0
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// Publishes new settings (reload).
    pub fn replace(&self, security: Security) {
        *self.0.write().unwrap_or_else(|poison| poison.into_inner()) = Arc::new(security);
    }
}
