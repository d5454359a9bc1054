//! HTTPS at the edge: Pingora's rustls listener with a certificate store keyed by SNI.
//!
//! Certificates come from PEM files named in `[tls] certificates`; the names each one serves
//! are read from the certificate itself (its DNS subjectAltNames, else its common name), so
//! the configuration cannot disagree with the certificate. A wildcard (`*.apps.example.com`)
//! serves exactly one label below its base, as browsers check it. The store is swapped whole
//! on reload (SIGHUP, or a change of the files seen by a poll): new handshakes get the new
//! certificates, open connections keep theirs, and a reload that fails keeps the old store.
//!
//! Why rustls: it needs only a C compiler (ring), where Pingora's `openssl` feature builds a
//! vendored OpenSSL on every clean build; and since Pingora 0.9 its rustls listener takes a
//! certificate resolver, which is what SNI selection and reload without restart need.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::ArcSwap;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde::Deserialize;
use tokio::sync::watch;

/// `[tls]`: the HTTPS listener. Off unless `listen` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Address of the HTTPS listener (e.g. `0.0.0.0:443`). Unset: no TLS.
    pub listen: Option<SocketAddr>,
    /// Certificate chains and their keys (PEM). The first one is the default certificate
    /// (clients without SNI, or with a name no certificate covers when `unknown_sni` is
    /// `default`).
    pub certificates: Vec<CertificateFiles>,
    /// A client naming a host no certificate covers: `default` answers with the default
    /// certificate (the client then reports a name mismatch); `reject` fails the handshake.
    pub unknown_sni: UnknownSni,
    /// Offer HTTP/2 by ALPN (with HTTP/1.1 for clients that do not speak it).
    pub http2: bool,
    /// The plain listener answers every request with a 308 to the same URL over HTTPS.
    pub redirect_http: bool,
    /// The port written in those redirects (default: the port of `listen`; 443 is left out of
    /// the URL). Set it when a load balancer or NAT maps another port to `listen`.
    pub redirect_port: Option<u16>,
    /// `Strict-Transport-Security: max-age=N` on HTTPS answers (0: not sent). Upstreams that
    /// send their own keep it.
    pub hsts_max_age_seconds: u64,
    /// Adds `includeSubDomains` to that header.
    pub hsts_include_subdomains: bool,
    /// How often the certificate files are checked for changes (0: only on SIGHUP).
    #[serde(deserialize_with = "de_check_seconds")]
    pub reload_check_seconds: f64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            listen: None,
            certificates: Vec::new(),
            unknown_sni: UnknownSni::Default,
            http2: true,
            redirect_http: false,
            redirect_port: None,
            hsts_max_age_seconds: 0,
            hsts_include_subdomains: false,
            reload_check_seconds: 10.0,
        }
    }
}

impl TlsConfig {
    /// Whether the settings hang together (checked before anything binds).
    pub fn check(&self) -> Result<(), String> {
        match self.listen {
            None if self.redirect_http => Err(
                "tls.redirect_http needs tls.listen (the HTTPS listener the redirects point at)"
                    .into(),
            ),
            Some(_) if self.certificates.is_empty() => Err(
                "tls.listen is set but tls.certificates is empty: add [[tls.certificates]] cert = \"…pem\", key = \"…pem\""
                    .into(),
            ),
            _ => Ok(()),
        }
    }

    /// The port HTTPS redirects point at.
    pub fn public_port(&self) -> Option<u16> {
        self.redirect_port.or(self.listen.map(|a| a.port()))
    }

    /// The `Strict-Transport-Security` value, when configured.
    pub fn hsts_value(&self) -> Option<String> {
        (self.hsts_max_age_seconds > 0).then(|| {
            if self.hsts_include_subdomains {
                format!("max-age={}; includeSubDomains", self.hsts_max_age_seconds)
            } else {
                format!("max-age={}", self.hsts_max_age_seconds)
            }
        })
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// The chain: the server certificate first, then intermediates.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnknownSni {
    Default,
    Reject,
}

fn de_check_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    use serde::de::Error as _;
    let v = f64::deserialize(d)?;
    if !v.is_finite() || !(0.0..=86_400.0).contains(&v) {
        return Err(D::Error::custom(format!(
            "{v}: expected 0 (SIGHUP only) to 86400 seconds"
        )));
    }
    Ok(v)
}

/// One loaded generation of certificates.
struct Store {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is kept under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
    count: usize,
    /// Earliest end of validity among them (Unix seconds).
    earliest_expiry: i64,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("exact", &self.exact.keys().collect::<Vec<_>>())
            .field("wildcard", &self.wildcard.keys().collect::<Vec<_>>())
            .field("count", &self.count)
            .finish()
    }
}

impl Store {
    fn find(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        let name = name.strip_suffix('.').unwrap_or(name);
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if let Some(c) = self.exact.get(name) {
            return Some(c);
        }
        let (label, parent) = name.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        self.wildcard.get(parent)
    }

    fn load(files: &[CertificateFiles]) -> anyhow::Result<Store> {
        pingora::tls::install_default_crypto_provider();
        let provider = CryptoProvider::get_default()
            .context("no TLS crypto provider is installed")?
            .clone();
        // name → (certificate, its end of validity)
        let mut exact: HashMap<String, (Arc<CertifiedKey>, i64)> = HashMap::new();
        let mut wildcard: HashMap<String, (Arc<CertifiedKey>, i64)> = HashMap::new();
        let mut default = None;
        for f in files {
            let (key, names, not_after) = load_pair(f, &provider)?;
            for n in names {
                let (map, base) = match n.strip_prefix("*.") {
                    Some(base) => (&mut wildcard, base.to_owned()),
                    None => (&mut exact, n),
                };
                // Two certificates for one name (a renewal listed beside the old one): the one
                // valid longer serves it.
                let e = map.entry(base).or_insert_with(|| (key.clone(), not_after));
                if not_after > e.1 {
                    *e = (key.clone(), not_after);
                }
            }
            default.get_or_insert((key, not_after));
        }
        let (default, default_expiry) =
            default.context("no certificate configured (tls.certificates)")?;
        // The earliest expiry among the certificates that serve something.
        let earliest_expiry = exact
            .values()
            .chain(wildcard.values())
            .map(|(_, t)| *t)
            .fold(default_expiry, i64::min);
        let strip = |m: HashMap<String, (Arc<CertifiedKey>, i64)>| {
            m.into_iter().map(|(k, (c, _))| (k, c)).collect()
        };
        Ok(Store {
            count: files.len(),
            exact: strip(exact),
            wildcard: strip(wildcard),
            default,
            earliest_expiry,
        })
    }
}

/// Reads one chain and key, checks they belong together, and returns the names the
/// certificate covers and its end of validity.
fn load_pair(
    f: &CertificateFiles,
    provider: &CryptoProvider,
) -> anyhow::Result<(Arc<CertifiedKey>, Vec<String>, i64)> {
    let path = |p: &Path| {
        p.to_str()
            .map(str::to_owned)
            .with_context(|| format!("{}: the path is not UTF-8", p.display()))
    };
    let (cert, key) = (path(&f.cert)?, path(&f.key)?);
    let loaded = pingora::tls::load_certs_and_key_files(&cert, &key)
        .map_err(|e| anyhow::anyhow!("{cert} / {key}: {e}"))?;
    let (chain, private) = loaded.with_context(|| {
        format!("{cert} / {key}: no PEM certificate in the first or no private key in the second")
    })?;
    let leaf = chain
        .first()
        .with_context(|| format!("{cert}: no certificate"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| anyhow::anyhow!("{cert}: not a valid X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for g in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = g {
                names.push(n.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        // Old-style certificates name their host only in the subject.
        for cn in parsed.subject().iter_common_name() {
            if let Ok(n) = cn.as_str() {
                names.push(n.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        anyhow::bail!("{cert}: the certificate names no DNS host (subjectAltName or CN)");
    }
    let not_after = parsed.validity().not_after.timestamp();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if not_after < now {
        tracing::warn!(cert = %cert, names = ?names, "this certificate has expired; clients will refuse it");
    }
    let ck = CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        anyhow::anyhow!("{cert} / {key}: the key does not fit the certificate: {e}")
    })?;
    Ok((Arc::new(ck), names, not_after))
}

/// The handshake's certificate choice, from the current store.
#[derive(Debug)]
pub struct SniResolver {
    current: ArcSwap<Store>,
    reject_unknown: bool,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let store = self.current.load();
        match hello.server_name() {
            None => Some(store.default.clone()),
            Some(name) => match store.find(name) {
                Some(c) => Some(c.clone()),
                None if self.reject_unknown => None,
                None => Some(store.default.clone()),
            },
        }
    }
}

struct TlsMetrics {
    certificates: IntGauge,
    expiry: IntGauge,
    reloads: IntCounterVec,
}

impl TlsMetrics {
    fn new(registry: &Registry) -> anyhow::Result<TlsMetrics> {
        let certificates = IntGauge::new(
            "tollgate_tls_certificates",
            "Certificates loaded for the HTTPS listener",
        )?;
        let expiry = IntGauge::new(
            "tollgate_tls_certificate_expiry_timestamp_seconds",
            "When the first of the loaded certificates expires (Unix time)",
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "tollgate_tls_reloads_total",
                "Certificate reloads by result (error: the previous certificates stay in use)",
            ),
            &["result"],
        )?;
        for r in ["ok", "error"] {
            reloads.with_label_values(&[r]);
        }
        registry.register(Box::new(certificates.clone()))?;
        registry.register(Box::new(expiry.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        Ok(TlsMetrics {
            certificates,
            expiry,
            reloads,
        })
    }

    fn show(&self, store: &Store) {
        self.certificates.set(store.count as i64);
        self.expiry.set(store.earliest_expiry);
    }
}

/// What identifies a file's content without reading it.
type Stamp = Option<(SystemTime, u64)>;

fn stamps(files: &[CertificateFiles]) -> Vec<Stamp> {
    files
        .iter()
        .flat_map(|f| [&f.cert, &f.key])
        .map(|p| {
            // Follows symlinks: a `live/` link swapped by an ACME client is a change.
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// The node's certificates: loaded at start (a bad file stops the start), reloaded on demand.
pub struct Certificates {
    files: Vec<CertificateFiles>,
    resolver: Arc<SniResolver>,
    seen: Mutex<Vec<Stamp>>,
    metrics: TlsMetrics,
}

impl Certificates {
    pub fn load(cfg: &TlsConfig, registry: &Registry) -> anyhow::Result<Arc<Certificates>> {
        cfg.check().map_err(anyhow::Error::msg)?;
        let seen = stamps(&cfg.certificates);
        let store = Store::load(&cfg.certificates).context("tls.certificates")?;
        let metrics = TlsMetrics::new(registry)?;
        metrics.show(&store);
        tracing::info!(
            certificates = store.count,
            names = ?store.exact.keys().chain(store.wildcard.keys()).collect::<Vec<_>>(),
            "TLS certificates loaded"
        );
        Ok(Arc::new(Certificates {
            files: cfg.certificates.clone(),
            resolver: Arc::new(SniResolver {
                current: ArcSwap::from_pointee(store),
                reject_unknown: cfg.unknown_sni == UnknownSni::Reject,
            }),
            seen: Mutex::new(seen),
            metrics,
        }))
    }

    pub fn resolver(&self) -> Arc<SniResolver> {
        self.resolver.clone()
    }

    /// Reads every file again and swaps the store in one step. On any error the old
    /// certificates stay in use and the reason is logged and returned.
    pub fn reload(&self) -> Result<usize, String> {
        let before = stamps(&self.files);
        match Store::load(&self.files) {
            Ok(store) => {
                let n = store.count;
                self.metrics.show(&store);
                self.resolver.current.store(Arc::new(store));
                self.metrics.reloads.with_label_values(&["ok"]).inc();
                if let Ok(mut s) = self.seen.lock() {
                    *s = before;
                }
                tracing::info!(certificates = n, "TLS certificates reloaded");
                Ok(n)
            }
            Err(e) => {
                if let Ok(mut s) = self.seen.lock() {
                    // Not retried until the files change again (or SIGHUP): one log line per
                    // bad state, not one per check.
                    *s = before;
                }
                self.metrics.reloads.with_label_values(&["error"]).inc();
                let reason = format!("{e:#}");
                tracing::error!(error = %reason, "TLS certificate reload failed; the previous certificates stay in use");
                Err(reason)
            }
        }
    }

    /// Reloads when a file's modification time or size changed since the last load.
    pub fn reload_if_changed(&self) {
        let now = stamps(&self.files);
        let changed = self.seen.lock().map(|s| *s != now).unwrap_or(true);
        if changed {
            let _ = self.reload();
        }
    }

    /// Checks the files every `every` until `stop`.
    pub async fn watch(self: Arc<Self>, every: Duration, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let me = self.clone();
            // File reads and key parsing stay off the async workers.
            let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<CertifiedKey> {
        // Only the choice is under test: any real certificate and key will do.
        pingora::tls::install_default_crypto_provider();
        let kp = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.test".to_owned()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let key = pingora::tls::PrivateKeyDer::try_from(kp.serialize_der()).unwrap();
        let provider = CryptoProvider::get_default().unwrap();
        Arc::new(CertifiedKey::from_der(vec![cert.der().clone()], key, provider).unwrap())
    }

    #[test]
    fn names_match_exactly_or_one_label_under_a_wildcard() {
        let (a, w) = (key(), key());
        let store = Store {
            exact: HashMap::from([("shop.example.com".to_owned(), a.clone())]),
            wildcard: HashMap::from([("apps.test".to_owned(), w.clone())]),
            default: a.clone(),
            count: 2,
            earliest_expiry: 0,
        };
        let is = |n: &str, k: &Arc<CertifiedKey>| store.find(n).is_some_and(|f| Arc::ptr_eq(f, k));
        assert!(is("shop.example.com", &a));
        assert!(
            is("SHOP.Example.com.", &a),
            "case and a trailing dot do not matter"
        );
        assert!(is("hello.apps.test", &w));
        assert!(is("Hello.Apps.Test", &w));
        for miss in [
            "a.b.apps.test",
            "apps.test",
            ".apps.test",
            "x.shop.example.com",
            "other.org",
            "",
        ] {
            assert!(store.find(miss).is_none(), "{miss}");
        }
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let mut c = TlsConfig {
            redirect_http: true,
            ..TlsConfig::default()
        };
        assert!(c.check().unwrap_err().contains("tls.listen"));
        c.listen = Some(SocketAddr::from(([127, 0, 0, 1], 8443)));
        assert!(c.check().unwrap_err().contains("tls.certificates"));
        c.certificates.push(CertificateFiles {
            cert: "a.pem".into(),
            key: "a.key".into(),
        });
        assert!(c.check().is_ok());
        assert_eq!(c.public_port(), Some(8443));
        c.redirect_port = Some(443);
        assert_eq!(c.public_port(), Some(443));
        assert_eq!(c.hsts_value(), None);
        c.hsts_max_age_seconds = 60;
        c.hsts_include_subdomains = true;
        assert_eq!(
            c.hsts_value().as_deref(),
            Some("max-age=60; includeSubDomains")
        );
    }
}
