//! `--web.config.file`: the Prometheus exporter-toolkit format, the subset Ark implements.
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /etc/ark/tls/tls.crt
//!   key_file: /etc/ark/tls/tls.key
//!   client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert
//!   client_ca_file: /etc/ark/tls/ca.crt
//!   min_version: TLS12                            # or TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...                        # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':')
//! ```
//!
//! Unknown keys and unsupported values are errors at start, never silently ignored: a typo in
//! a security setting must not serve plain text. The file is read once at start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    min_version: Option<String>,
}

/// The loaded configuration: what the server applies.
#[derive(Clone, Default)]
pub struct WebConfig {
    /// TLS on the listener; `None` = plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// User → bcrypt hash; empty = no basic auth.
    pub users: Arc<HashMap<String, String>>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl WebConfig {
    /// Reads and checks `path`; relative file names inside are relative to its directory.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --web.config.file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).with_context(|| format!("in --web.config.file {}", path.display()))
    }

    /// Parses the YAML text; `base` resolves relative file names.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Self> {
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            serde_yaml::from_str(text).context("invalid web configuration")?
        };
        for (user, hash) in &file.basic_auth_users {
            if user.is_empty() || user.contains(':') {
                bail!("basic_auth_users: invalid user name {user:?}");
            }
            hash.parse::<bcrypt::HashParts>()
                .map_err(|e| anyhow::anyhow!("basic_auth_users.{user}: not a bcrypt hash ({e})"))?;
        }
        let tls = match file.tls_server_config {
            Some(t) => Some(Arc::new(tls_config(&t, base)?)),
            None => None,
        };
        Ok(WebConfig {
            tls,
            users: Arc::new(file.basic_auth_users),
        })
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

fn tls_config(t: &TlsFile, base: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert_file = resolve(base, &t.cert_file);
    let key_file = resolve(base, &t.key_file);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_file)
        .with_context(|| format!("tls_server_config.cert_file {}", cert_file.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("tls_server_config.cert_file {}", cert_file.display()))?;
    if certs.is_empty() {
        bail!(
            "tls_server_config.cert_file {}: no certificate",
            cert_file.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&key_file)
        .with_context(|| format!("tls_server_config.key_file {}", key_file.display()))?;
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version.as_deref() {
        None | Some("TLS12") => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some("TLS13") => &[&rustls::version::TLS13],
        Some(v) => bail!("tls_server_config.min_version {v:?}: want TLS12 or TLS13"),
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .context("TLS protocol versions")?;
    let auth = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let roots = || -> anyhow::Result<Arc<rustls::RootCertStore>> {
        let ca = t.client_ca_file.as_deref().with_context(|| {
            format!("tls_server_config.client_auth_type {auth} needs client_ca_file")
        })?;
        let ca = resolve(base, ca);
        let mut store = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&ca)
            .with_context(|| format!("tls_server_config.client_ca_file {}", ca.display()))?
        {
            store
                .add(c.with_context(|| format!("client_ca_file {}", ca.display()))?)
                .with_context(|| format!("client_ca_file {}", ca.display()))?;
        }
        if store.is_empty() {
            bail!(
                "tls_server_config.client_ca_file {}: no certificate",
                ca.display()
            );
        }
        Ok(Arc::new(store))
    };
    let verifier = |optional: bool| -> anyhow::Result<_> {
        let b =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots()?, provider.clone());
        let b = if optional {
            b.allow_unauthenticated()
        } else {
            b
        };
        b.build().context("client certificate verifier")
    };
    let builder = match auth {
        "NoClientCert" => {
            if t.client_ca_file.is_some() {
                bail!(
                    "tls_server_config.client_ca_file is set but client_auth_type is NoClientCert"
                );
            }
            builder.with_no_client_auth()
        }
        "RequireAndVerifyClientCert" => builder.with_client_cert_verifier(verifier(false)?),
        "VerifyClientCertIfGiven" => builder.with_client_cert_verifier(verifier(true)?),
        "RequestClientCert" | "RequireAnyClientCert" => bail!(
            "tls_server_config.client_auth_type {auth} (a client certificate nobody verifies) is not supported: use RequireAndVerifyClientCert or VerifyClientCertIfGiven"
        ),
        other => bail!(
            "tls_server_config.client_auth_type {other:?}: want NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"
        ),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .context("tls_server_config: certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_users() {
        let c = WebConfig::parse("", Path::new(".")).unwrap();
        assert!(c.tls.is_none() && c.users.is_empty());
        let hash = bcrypt::hash("pw", 4).unwrap();
        let c = WebConfig::parse(
            &format!("basic_auth_users:\n  alice: '{hash}'\n"),
            Path::new("."),
        )
        .unwrap();
        assert!(c.users.contains_key("alice"));
    }

    #[test]
    fn errors_are_clear() {
        let e = |t: &str| {
            format!(
                "{:#}",
                WebConfig::parse(t, Path::new("/nonexistent")).unwrap_err()
            )
        };
        assert!(e("basic_auth_users:\n  alice: plain\n").contains("not a bcrypt hash"));
        assert!(e("tls_server_confg: {}\n").contains("unknown field"));
        assert!(
            e("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n")
                .contains("cert_file /nonexistent/a.crt")
        );
    }
}
