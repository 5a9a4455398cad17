//! `[ingest]` and its `[[ingest.sources]]`: what `waymark ingest` listens on and
//! which webhooks it takes, validated (secrets resolved, keys parsed) into
//! [`IngestSettings`] by the same `waymark check` as every other setting.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::auth::{easypost_key, Encoding, GenericHmac, HmacAlgorithm, Scheme};
use crate::config::{duration, ConfigError};

/// `[ingest]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestSection {
    /// Where the webhook receiver listens (`/webhooks/...`, `/metrics`,
    /// `/healthz`, `/readyz`).
    pub listen: String,
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// A request's headers must arrive within this.
    pub header_timeout: String,
    /// A request's body must arrive within this (408 otherwise).
    pub body_timeout: String,
    /// How long a request waits for the broker's acknowledgement before it is
    /// answered 503 (the provider retries).
    pub ack_timeout: String,
    /// `Retry-After` of a 503.
    pub retry_after: String,
    /// SIGTERM: requests in flight get this long to finish.
    pub shutdown_timeout: String,
    /// Timestamped signatures remembered to refuse replays (oldest first out).
    pub replay_capacity: usize,
    /// Peers (CIDR) whose `client_ip_header` is believed; from any other peer
    /// the header is ignored and the peer's own address is the client's.
    pub trusted_proxies: Vec<String>,
    /// The header a trusted proxy writes the client's address into.
    pub client_ip_header: String,
    pub sources: Vec<SourceSection>,
}

impl Default for IngestSection {
    fn default() -> Self {
        IngestSection {
            listen: "127.0.0.1:8080".into(),
            max_connections: 1024,
            header_timeout: "10s".into(),
            body_timeout: "30s".into(),
            ack_timeout: "10s".into(),
            retry_after: "30s".into(),
            shutdown_timeout: "30s".into(),
            replay_capacity: 1_000_000,
            trusted_proxies: Vec::new(),
            client_ip_header: "x-forwarded-for".into(),
            sources: Vec::new(),
        }
    }
}

/// `[[ingest.sources]]`: one provider's webhooks, at `POST /webhooks/<name>`
/// (or `/webhooks/<name>/<tenant>` with `tenant_in_path`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    pub name: String,
    /// The carrier (normalizer) of its bodies: a built-in or declared carrier.
    pub carrier: String,
    /// Default: `tracking.raw.<carrier>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The tenant of every request of this source ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// ... or the header that names it ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_header: Option<String>,
    /// ... or the last path segment names it (`/webhooks/<name>/<tenant>`).
    #[serde(default)]
    pub tenant_in_path: bool,
    /// Client addresses (CIDR) allowed; empty: any.
    #[serde(default)]
    pub allow: Vec<String>,
    /// A header of the provider's that identifies the delivery, copied to the
    /// record's `delivery-id` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_id_header: Option<String>,
    pub auth: AuthSection,
}

/// `[ingest.sources.auth]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub scheme: SchemeName,
    /// Signing secrets or shared credentials, several at once while rotating.
    /// Each is `env:NAME` (an environment variable), `file:PATH` (a file's
    /// content, trimmed), or the secret itself (keep such files private).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// EasyPost: `user:password` of basic auth in the webhook URL; Shippo: the
    /// `?token=` of the webhook URL. Same forms as `secrets`.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// DHL: the header named in the subscription's `hook.authentication`;
    /// `hmac`: the signature header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Timestamped signatures: how far off the request time may be (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<String>,
    /// ShipEngine: a JWKS file (`curl https://api.shipengine.com/jwks`); it is
    /// re-read when a request names a key id it does not hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// `hmac`: sha256 (default) or sha512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<HmacAlgorithm>,
    /// `hmac`: hex (default) or base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// `hmac`: text before the encoded MAC (`sha256=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// `hmac`: a header with the request time, signed as `timestamp + separator + body`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_header: Option<String>,
    /// `hmac`: between timestamp and body (default `.`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub separator: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SchemeName {
    Easypost,
    Aftership,
    Shippo,
    Fedex,
    Ups,
    Dhl,
    Usps,
    Shipengine,
    Hmac,
    None,
}

/// Where a request's tenant comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantFrom {
    /// No `tenant-id` header: the worker's `tenancy` rules apply.
    Unset,
    Fixed(String),
    Header(String),
    Path,
}

/// `[ingest]` as loaded, with what its validation needs: validated by the
/// commands that use it (`ingest`, `check`), so the worker never needs the
/// webhook secrets its configuration may name.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub section: IngestSection,
    /// Every carrier a source may name (built-in and declared).
    pub carriers: Vec<String>,
    /// The configuration file's directory (relative `file:` and `jwks_file` paths).
    pub base_dir: Option<PathBuf>,
}

impl IngestConfig {
    pub fn validate(&self) -> Result<IngestSettings, ConfigError> {
        let carriers: Vec<&str> = self.carriers.iter().map(String::as_str).collect();
        self.section.validate(&carriers, self.base_dir.as_deref())
    }
}

/// One validated source.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub carrier: String,
    pub topic: String,
    pub tenant: TenantFrom,
    pub allow: Vec<IpNet>,
    pub delivery_id_header: Option<String>,
    pub scheme: Scheme,
    /// The tolerance of timestamped signatures (how long a replay is remembered).
    pub tolerance: Duration,
    /// ShipEngine's JWKS file, re-read for an unknown key id.
    pub jwks_file: Option<PathBuf>,
}

/// `[ingest]`, validated.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub ack_timeout: Duration,
    pub retry_after: Duration,
    pub shutdown_timeout: Duration,
    pub replay_capacity: usize,
    pub trusted_proxies: Vec<IpNet>,
    pub client_ip_header: String,
    pub sources: Vec<Source>,
}

impl IngestSection {
    /// Validate, resolving `env:`/`file:` secrets (relative paths against
    /// `base_dir`) and checking each source's carrier against `carriers`.
    pub fn validate(&self, carriers: &[&str], base_dir: Option<&Path>) -> Result<IngestSettings, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid(message);
        let listen = self
            .listen
            .parse()
            .map_err(|e| invalid(format!("ingest.listen = \"{}\": {e} (write an address and port, e.g. \"0.0.0.0:8080\")", self.listen)))?;
        if self.max_connections == 0 {
            return Err(invalid("ingest.max_connections must be at least 1".into()));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut sources = Vec::with_capacity(self.sources.len());
        for section in &self.sources {
            let source = section.validate(carriers, base_dir)?;
            if !names.insert(source.name.clone()) {
                return Err(invalid(format!("ingest.sources: two sources are named \"{}\": names are paths, make them unique", source.name)));
            }
            sources.push(source);
        }
        Ok(IngestSettings {
            listen,
            max_connections: self.max_connections,
            header_timeout: duration("ingest.header_timeout", &self.header_timeout)?,
            body_timeout: duration("ingest.body_timeout", &self.body_timeout)?,
            ack_timeout: duration("ingest.ack_timeout", &self.ack_timeout)?,
            retry_after: duration("ingest.retry_after", &self.retry_after)?,
            shutdown_timeout: duration("ingest.shutdown_timeout", &self.shutdown_timeout)?,
            replay_capacity: self.replay_capacity.max(1),
            trusted_proxies: networks("ingest.trusted_proxies", &self.trusted_proxies)?,
            client_ip_header: self.client_ip_header.to_ascii_lowercase(),
            sources,
        })
    }
}

impl SourceSection {
    fn validate(&self, carriers: &[&str], base_dir: Option<&Path>) -> Result<Source, ConfigError> {
        let name = &self.name;
        let field = |key: &str| format!("ingest.sources[{name}].{key}");
        let invalid = |message: String| ConfigError::Invalid(message);
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
            return Err(invalid(format!("ingest.sources: name \"{name}\" must be lower-case letters, digits, - or _ (it is a URL path segment)")));
        }
        let carrier = self.carrier.trim().to_ascii_lowercase();
        if !carriers.contains(&carrier.as_str()) {
            return Err(invalid(format!("{} = \"{}\" is not a known carrier (known: {})", field("carrier"), self.carrier, carriers.join(", "))));
        }
        let tenant = match (&self.tenant, &self.tenant_header, self.tenant_in_path) {
            (None, None, false) => TenantFrom::Unset,
            (Some(t), None, false) if !t.trim().is_empty() => TenantFrom::Fixed(t.trim().to_string()),
            (None, Some(h), false) if !h.trim().is_empty() => TenantFrom::Header(h.trim().to_ascii_lowercase()),
            (None, None, true) => TenantFrom::Path,
            _ => return Err(invalid(format!("ingest.sources[{name}]: set one of tenant, tenant_header or tenant_in_path (or none: the worker's tenancy rules apply)"))),
        };
        let secrets = resolve_all(&field("auth.secrets"), &self.auth.secrets, base_dir)?;
        let tokens = resolve_all(&field("auth.tokens"), &self.auth.tokens, base_dir)?;
        let tolerance = duration(&field("auth.tolerance"), self.auth.tolerance.as_deref().unwrap_or("5m"))?;
        let need = |what: &[Vec<u8>], key: &str, hint: &str| {
            if what.is_empty() {
                Err(invalid(format!("{} is empty: the {:?} scheme needs {hint}", field(key), self.auth.scheme)))
            } else {
                Ok(())
            }
        };
        let allow = networks(&field("allow"), &self.allow)?;
        let mut jwks_file = None;
        let scheme = match self.auth.scheme {
            SchemeName::Easypost => {
                if secrets.is_empty() && tokens.is_empty() {
                    need(&secrets, "auth.secrets", "the webhook secret (or auth.tokens with user:password of basic auth)")?;
                }
                // The client libraries key v1 with the NFKD form; third-party v2
                // verifiers use the secret as written: both forms are tried (they
                // are the same for an ASCII secret).
                let mut keys = Vec::new();
                for secret in secrets {
                    let normalized = easypost_key(&String::from_utf8_lossy(&secret));
                    if normalized != secret {
                        keys.push(normalized);
                    }
                    keys.push(secret);
                }
                let secrets = keys;
                Scheme::EasyPost { secrets, basic: tokens, tolerance }
            }
            SchemeName::Aftership => {
                need(&secrets, "auth.secrets", "the webhook secret")?;
                Scheme::AfterShip { secrets }
            }
            SchemeName::Shippo => {
                if secrets.is_empty() && tokens.is_empty() {
                    need(&secrets, "auth.secrets", "the HMAC secret (or auth.tokens with the URL's ?token=)")?;
                }
                Scheme::Shippo { secrets, tokens, tolerance }
            }
            SchemeName::Fedex => {
                need(&secrets, "auth.secrets", "the project's security token")?;
                Scheme::FedEx { secrets }
            }
            SchemeName::Ups => {
                need(&secrets, "auth.secrets", "the subscription's credential")?;
                Scheme::Ups { credentials: secrets }
            }
            SchemeName::Dhl => {
                need(&secrets, "auth.secrets", "the token of the subscription's hook.authentication")?;
                let header = self.auth.header.clone().ok_or_else(|| invalid(format!("{} is not set: name the header of the subscription's hook.authentication", field("auth.header"))))?;
                Scheme::Dhl { header: header.to_ascii_lowercase(), keys: secrets }
            }
            SchemeName::Usps => {
                need(&secrets, "auth.secrets", "the subscription's 32-character secret")?;
                Scheme::Usps { secrets }
            }
            SchemeName::Shipengine => {
                let path = self.auth.jwks_file.as_ref().ok_or_else(|| {
                    invalid(format!("{} is not set: save ShipEngine's keys (curl -o jwks.json https://api.shipengine.com/jwks) and name the file", field("auth.jwks_file")))
                })?;
                let path = match base_dir {
                    Some(dir) if path.is_relative() => dir.join(path),
                    _ => path.clone(),
                };
                let keys = super::jwks::read_file(&path).map_err(|e| invalid(format!("{}: {e}", field("auth.jwks_file"))))?;
                jwks_file = Some(path);
                Scheme::ShipEngine { keys, tolerance }
            }
            SchemeName::Hmac => {
                need(&secrets, "auth.secrets", "the signing secret")?;
                let header = self.auth.header.clone().ok_or_else(|| invalid(format!("{} is not set: name the signature header", field("auth.header"))))?;
                Scheme::Hmac {
                    spec: GenericHmac {
                        header: header.to_ascii_lowercase(),
                        algorithm: self.auth.algorithm.unwrap_or(HmacAlgorithm::Sha256),
                        encoding: self.auth.encoding.unwrap_or(Encoding::Hex),
                        prefix: self.auth.prefix.clone().unwrap_or_default(),
                        timestamp_header: self.auth.timestamp_header.as_ref().map(|h| h.to_ascii_lowercase()),
                        separator: self.auth.separator.clone().unwrap_or_else(|| ".".into()),
                    },
                    secrets,
                    tolerance,
                }
            }
            SchemeName::None => {
                if allow.is_empty() {
                    return Err(invalid(format!("ingest.sources[{name}]: auth.scheme = \"none\" needs an allow list (the only gate left)")));
                }
                Scheme::None
            }
        };
        Ok(Source {
            name: name.clone(),
            topic: self.topic.clone().unwrap_or_else(|| format!("tracking.raw.{carrier}")),
            carrier,
            tenant,
            allow,
            delivery_id_header: self.delivery_id_header.as_ref().map(|h| h.to_ascii_lowercase()),
            scheme,
            tolerance,
            jwks_file,
        })
    }
}

impl IngestSettings {
    /// The client's address: the peer's, or, when the peer is a trusted proxy,
    /// the right-most address of `client_ip_header` that is not a trusted proxy
    /// itself (addresses left of it were written by the client and prove nothing).
    pub fn client_address(&self, peer: IpAddr, forwarded: Option<&str>) -> IpAddr {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|net| net.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let Some(header) = forwarded else { return peer };
        for part in header.rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) if trusted(&ip) => continue,
                Ok(ip) => return ip,
                Err(_) => return peer,
            }
        }
        peer
    }
}

fn networks(field: &str, list: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .map(|text| {
            let text = text.trim();
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| ConfigError::Invalid(format!("{field}: \"{text}\" is not an address or CIDR range (write e.g. \"20.65.16.22/31\")")))
        })
        .collect()
}

/// `env:NAME`, `file:PATH` or the secret itself. Errors name the variable or
/// file, never a value.
fn resolve_all(field: &str, list: &[String], base_dir: Option<&Path>) -> Result<Vec<Vec<u8>>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, spec)| {
            let value = if let Some(name) = spec.strip_prefix("env:") {
                std::env::var(name).map_err(|_| ConfigError::Invalid(format!("{field}[{i}]: environment variable {name} is not set")))?
            } else if let Some(path) = spec.strip_prefix("file:") {
                let path = match base_dir {
                    Some(dir) if Path::new(path).is_relative() => dir.join(path),
                    _ => PathBuf::from(path),
                };
                std::fs::read_to_string(&path)
                    .map_err(|e| ConfigError::Invalid(format!("{field}[{i}]: cannot read {}: {e}", path.display())))?
                    .trim()
                    .to_string()
            } else {
                spec.clone()
            };
            if value.is_empty() {
                return Err(ConfigError::Invalid(format!("{field}[{i}] is empty")));
            }
            Ok(value.into_bytes())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> Result<IngestSettings, ConfigError> {
        let section: IngestSection = toml::from_str(toml).unwrap();
        section.validate(&["easypost", "ups", "dhl"], None)
    }

    #[test]
    fn sources_validate_with_what_each_scheme_needs() {
        let ok = settings(
            r#"
            [[sources]]
            name = "easypost"
            carrier = "EasyPost"
            tenant = "acme"
            auth = { scheme = "easypost", secrets = ["sécret"] }
            [[sources]]
            name = "dhl"
            carrier = "dhl"
            tenant_in_path = true
            allow = ["10.0.0.0/8", "192.0.2.7"]
            auth = { scheme = "dhl", header = "X-Hook-Key", secrets = ["k"] }
            "#,
        )
        .unwrap();
        assert_eq!(ok.sources[0].topic, "tracking.raw.easypost");
        assert_eq!(ok.sources[1].tenant, TenantFrom::Path);
        assert_eq!(ok.sources[1].allow.len(), 2);
        for (bad, says) in [
            (r#"[[sources]]
                name = "x"
                carrier = "fedexx"
                auth = { scheme = "fedex", secrets = ["k"] }"#, "not a known carrier"),
            (r#"[[sources]]
                name = "Bad Name"
                carrier = "ups"
                auth = { scheme = "ups", secrets = ["k"] }"#, "URL path segment"),
            (r#"[[sources]]
                name = "u"
                carrier = "ups"
                auth = { scheme = "ups" }"#, "needs the subscription's credential"),
            (r#"[[sources]]
                name = "d"
                carrier = "dhl"
                auth = { scheme = "dhl", secrets = ["k"] }"#, "auth.header is not set"),
            (r#"[[sources]]
                name = "n"
                carrier = "dhl"
                auth = { scheme = "none" }"#, "needs an allow list"),
            (r#"[[sources]]
                name = "e"
                carrier = "ups"
                auth = { scheme = "ups", secrets = ["env:WAYMARK_TEST_SURELY_UNSET_VARIABLE"] }"#, "WAYMARK_TEST_SURELY_UNSET_VARIABLE is not set"),
            (r#"[[sources]]
                name = "t"
                carrier = "ups"
                tenant = "a"
                tenant_in_path = true
                auth = { scheme = "ups", secrets = ["k"] }"#, "set one of tenant"),
        ] {
            let message = settings(bad).unwrap_err().to_string();
            assert!(message.contains(says), "{bad}\n=> {message}");
        }
    }

    #[test]
    fn a_forwarded_address_counts_only_from_a_trusted_proxy() {
        let mut ingest = settings("").unwrap();
        ingest.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.1.2.3".parse().unwrap();
        let outside: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(ingest.client_address(outside, Some("20.65.16.22")), outside, "an untrusted peer's header is ignored");
        assert_eq!(ingest.client_address(peer, Some("20.65.16.22")), "20.65.16.22".parse::<IpAddr>().unwrap());
        assert_eq!(
            ingest.client_address(peer, Some("20.65.16.22, 198.51.100.1, 10.9.9.9")),
            "198.51.100.1".parse::<IpAddr>().unwrap(),
            "the right-most untrusted hop, not what the client wrote first"
        );
        assert_eq!(ingest.client_address(peer, None), peer);
        assert_eq!(ingest.client_address(peer, Some("garbage")), peer);
    }
}
