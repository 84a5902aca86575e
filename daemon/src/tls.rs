//! TLS for broker connections (the fleet link and MQTT feeds): rustls with the ring provider, roots from a CA file or the
//! system, an optional client certificate. Built once by `check-config` (so a bad file is a
//! config error naming the key) and again on every connect.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// TLS settings for a broker connection.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// None: the system's trusted roots.
    pub ca_file: Option<PathBuf>,
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Build the client configuration, or name the config key whose file is wrong and why.
pub fn client_config(t: &TlsConfig) -> Result<Arc<ClientConfig>, (&'static str, String)> {
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca_file {
        Some(ca) => {
            let certs = read_certs(ca).map_err(|e| ("ca_file", e))?;
            for c in certs {
                roots.add(c).map_err(|e| {
                    (
                        "ca_file",
                        format!("`{}`: unusable CA certificate: {e}", ca.display()),
                    )
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err((
                    "ca_file",
                    "no ca_file is set and the system has no trusted CA certificates".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("ca_file", e.to_string()))?
        .with_root_certificates(roots);
    let config = match &t.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = read_certs(cert).map_err(|e| ("cert_file", e))?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                (
                    "key_file",
                    format!("`{}`: no usable private key: {e}", key.display()),
                )
            })?;
            builder.with_client_auth_cert(certs, key_der).map_err(|e| {
                (
                    "key_file",
                    format!(
                        "`{}` does not go with `{}`: {e}",
                        key.display(),
                        cert.display()
                    ),
                )
            })?
        }
    };
    Ok(Arc::new(config))
}

fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{}` is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("`{}` holds no PEM certificate", path.display()));
    }
    Ok(certs)
}
