//! The workerd config for one deployment version, as capnp text.

use std::collections::BTreeMap;
use std::fmt::Write;

/// The header carrying a deployment's database token (the database service reads it).
pub const TOKEN_HEADER: &str = "x-tollgate-d1-token";

/// What goes into one workerd process.
#[derive(Debug, Clone)]
pub struct WorkerConfig<'a> {
    /// File name of the bundle, next to the config file.
    pub module_file: &'a str,
    pub compatibility_date: &'a str,
    pub compatibility_flags: &'a [String],
    /// Env vars and secrets; become text bindings on `env`.
    pub bindings: &'a BTreeMap<String, String>,
    /// D1 bindings (names) over the database service at `d1`.
    pub databases: &'a [String],
    /// The database service (`IP:PORT` or `unix:/path`) and this deployment's token.
    pub d1: Option<(&'a str, &'a str)>,
    /// The address the tenant's HTTP socket binds (port chosen by workerd).
    pub listen_ip: std::net::IpAddr,
}

/// A binding name workerd (and JavaScript) accepts: an identifier.
pub fn valid_binding_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 128
}

/// A `YYYY-MM-DD` date, as workerd wants for `compatibilityDate`.
pub fn valid_compatibility_date(date: &str) -> bool {
    let b = date.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// Quotes `s` as a capnp text literal.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Renders the config. Callers validate names and dates first (see [`valid_binding_name`]).
///
/// Outbound `fetch` goes to an explicit network service that allows only public addresses, so
/// tenant code cannot reach loopback (Redis, the control API, other tenants' ports) or private
/// ranges, whatever workerd's defaults become.
pub fn render(cfg: &WorkerConfig<'_>) -> String {
    let mut bindings = String::new();
    for (name, value) in cfg.bindings {
        let _ = write!(
            bindings,
            "(name = {}, text = {}), ",
            quote(name),
            quote(value)
        );
    }
    // A D1 binding is workerd's own `d1-api` module wrapped around a service binding; the
    // service is ours, on loopback, and the deployment's token rides on every request as an
    // injected header. Tenant `fetch()` still cannot reach loopback: only the binding can.
    let mut d1_service = String::new();
    if let (false, Some((addr, token))) = (cfg.databases.is_empty(), cfg.d1) {
        let _ = write!(
            d1_service,
            ",\n    (name = \"d1\", external = (address = {}, http = (injectRequestHeaders = [(name = {}, value = {})])))",
            quote(addr),
            quote(TOKEN_HEADER),
            quote(token)
        );
        for name in cfg.databases {
            let _ = write!(
                bindings,
                "(name = {}, wrapped = (moduleName = \"cloudflare-internal:d1-api\", innerBindings = [(name = \"fetcher\", service = \"d1\")])), ",
                quote(name)
            );
        }
    }
    let flags = cfg
        .compatibility_flags
        .iter()
        .map(|f| quote(f))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [
    (name = "main", worker = .tenant),
    (name = "egress", network = (allow = ["public"], deny = ["private", "local"{deny_runtime}])){d1_service}
  ],
  sockets = [ (name = "http", address = {listen}, http = (), service = "main") ],
  structuredLogging = true,
);
const tenant :Workerd.Worker = (
  modules = [ (name = "worker.js", esModule = embed {module}) ],
  compatibilityDate = {date},
  compatibilityFlags = [{flags}],
  bindings = [{bindings}],
  globalOutbound = "egress",
);
"#,
        module = quote(cfg.module_file),
        listen = quote(&std::net::SocketAddr::from((cfg.listen_ip, 0)).to_string()),
        // Other tenants' processes listen on this address too: never reachable from tenant
        // code, whatever class the address is in (a public or global IPv6 pod address).
        deny_runtime = if cfg.listen_ip.is_loopback() {
            String::new()
        } else {
            let bits = if cfg.listen_ip.is_ipv4() { 32 } else { 128 };
            format!(", {}", quote(&format!("{}/{bits}", cfg.listen_ip)))
        },
        date = quote(cfg.compatibility_date),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_hostile_values() {
        assert_eq!(quote("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\x01\"");
    }

    #[test]
    fn tenant_code_cannot_reach_the_runtime_address_of_other_tenants() {
        let render_on = |ip: std::net::IpAddr| {
            render(&WorkerConfig {
                module_file: "worker.js",
                compatibility_date: "2025-01-01",
                compatibility_flags: &[],
                bindings: &BTreeMap::new(),
                databases: &[],
                d1: None,
                listen_ip: ip,
            })
        };
        let local = render_on([127, 0, 0, 1].into());
        assert!(local.contains(r#"address = "127.0.0.1:0""#), "{local}");
        assert!(local.contains(r#"deny = ["private", "local"]"#), "{local}");
        let pod = render_on([203, 0, 113, 7].into());
        assert!(pod.contains(r#"address = "203.0.113.7:0""#), "{pod}");
        assert!(
            pod.contains(r#"deny = ["private", "local", "203.0.113.7/32"]"#),
            "{pod}"
        );
        let v6 = render_on("2001:db8::7".parse().unwrap());
        assert!(v6.contains(r#"address = "[2001:db8::7]:0""#), "{v6}");
        assert!(v6.contains(r#""2001:db8::7/128""#), "{v6}");
    }

    #[test]
    fn names_and_dates() {
        assert!(valid_binding_name("API_KEY"));
        assert!(valid_binding_name("_x1"));
        assert!(!valid_binding_name("1X"));
        assert!(!valid_binding_name("A-B"));
        assert!(!valid_binding_name(""));
        assert!(valid_compatibility_date("2025-01-01"));
        assert!(!valid_compatibility_date("2025-1-01"));
        assert!(!valid_compatibility_date("2025-01-0x"));
    }
}
