//! Webhook authentication, one scheme per provider, each exactly as the provider
//! documents it (the source of every detail is cited at its scheme).
//!
//! Pure: a request's method, path, query, headers and raw body in, a verdict out,
//! with the time passed in. The server (`super::server`) reads the request and
//! answers 401 for any [`AuthFailure`]; nothing here logs, and no failure carries
//! a secret or a signature, so neither can reach a log line, an error or a metric.
//!
//! Every comparison of secret material is constant-time: MACs through
//! [`Mac::verify_slice`], shared credentials by comparing their BLAKE3 digests
//! with `subtle` (equal-length digests, so not even the length leaks).
//! Several secrets per source are tried in turn, so a secret can be rotated
//! without downtime: add the new one, switch the provider, remove the old one.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rsa::pkcs1v15::{Signature as RsaSignature, VerifyingKey};
use rsa::signature::Verifier as _;
use rsa::RsaPublicKey;
use sha2::{Sha256, Sha512};
use subtle::ConstantTimeEq;
use unicode_normalization::UnicodeNormalization;

/// Why a request was refused (the `reason` label of
/// `waymark_ingest_auth_failures_total`). Deliberately coarse: a caller learns
/// which check failed, never anything about the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("the signature or credential header is missing")]
    Missing,
    #[error("the signature header cannot be read")]
    Malformed,
    #[error("the signature does not match the body with any configured secret")]
    BadSignature,
    #[error("the credential matches none configured")]
    BadCredential,
    #[error("the signed timestamp is older than the tolerance")]
    Stale,
    #[error("the signed timestamp is further in the future than the tolerance")]
    Future,
    #[error("this signature was already accepted once")]
    Replayed,
    #[error("the signing key id is not among the configured keys")]
    UnknownKey,
    #[error("the client address is not allowed for this source")]
    AddressNotAllowed,
}

impl AuthFailure {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::BadCredential => "bad_credential",
            AuthFailure::Stale => "stale_timestamp",
            AuthFailure::Future => "future_timestamp",
            AuthFailure::Replayed => "replayed",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::AddressNotAllowed => "address_not_allowed",
        }
    }

    /// Every reason, for zeroed metric series.
    pub const ALL: [AuthFailure; 9] = [
        AuthFailure::Missing,
        AuthFailure::Malformed,
        AuthFailure::BadSignature,
        AuthFailure::BadCredential,
        AuthFailure::Stale,
        AuthFailure::Future,
        AuthFailure::Replayed,
        AuthFailure::UnknownKey,
        AuthFailure::AddressNotAllowed,
    ];
}

/// A request's headers, looked up by lower-case name. A value that is not
/// visible ASCII reads as absent (no provider sends one).
pub trait Headers {
    fn get(&self, name: &str) -> Option<&str>;
}

/// Headers as a list of `(name, value)` (tests, fuzz targets).
pub struct HeaderList<'a>(pub &'a [(&'a str, &'a str)]);

impl Headers for HeaderList<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }
}

/// What a request presents.
pub struct Presented<'a> {
    pub method: &'a str,
    /// The path as received (no query).
    pub path: &'a str,
    /// The raw query string, if any (`token=...`).
    pub query: Option<&'a str>,
    pub headers: &'a dyn Headers,
    /// The raw body, byte for byte: every signature is over these bytes.
    pub body: &'a [u8],
}

/// A verified request. `replay_key` is set for schemes whose signature covers
/// a timestamp: the same signature inside the tolerance is a replay, which the
/// server refuses with [`ReplayGuard`]. Schemes without a timestamp cannot tell
/// a replay from a provider's own retry (same body, same signature); the
/// worker's dedupe absorbs both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verified {
    pub replay_key: Option<[u8; 32]>,
}

/// HMAC digest of a generic scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HmacAlgorithm {
    Sha256,
    Sha512,
}

/// How a generic scheme writes its MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    Hex,
    Base64,
}

/// The generic HMAC scheme, for declared carriers and providers not listed:
/// `header: prefix + encode(HMAC(secret, message))`, where the message is the
/// body, or, with a timestamp header, `timestamp + separator + body`.
#[derive(Debug, Clone)]
pub struct GenericHmac {
    pub header: String,
    pub algorithm: HmacAlgorithm,
    pub encoding: Encoding,
    pub prefix: String,
    pub timestamp_header: Option<String>,
    pub separator: String,
}

/// A source's authentication, validated (secrets resolved, keys parsed).
#[derive(Clone)]
pub enum Scheme {
    /// EasyPost (<https://docs.easypost.com/guides/webhooks-guide>; the exact
    /// construction from the official client libraries, `easypost-python`
    /// `easypost/util.py::validate_webhook`, `easypost-go` `webhook.go`):
    /// `X-Hmac-Signature: hmac-sha256-hex=<hex HMAC-SHA256(NFKD(secret), body)>`.
    /// Also the timestamped v2 signature (see [`easypost_v2`]) and the
    /// documented alternative, basic auth in the webhook URL
    /// (`https://user:password@host/...`), configured as `user:password`.
    EasyPost { secrets: Vec<Vec<u8>>, basic: Vec<Vec<u8>>, tolerance: Duration },
    /// AfterShip (<https://www.aftership.com/docs/tracking/webhook/webhook-signature>):
    /// `aftership-hmac-sha256: base64(HMAC-SHA256(secret, body))`; AfterShip
    /// Returns and Shipping send the same MAC as `as-signature-hmac-sha256`;
    /// organisations created before 2022-10-25 as `am-webhook-signature:
    /// hmac-sha256=<base64>`.
    AfterShip { secrets: Vec<Vec<u8>> },
    /// Shippo (<https://docs.goshippo.com/docs/tracking/webhooks/>): the opt-in
    /// `Shippo-Auth-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
    /// "t.body")>` with a timestamp tolerance; or the documented `?token=` in
    /// the webhook URL.
    Shippo { secrets: Vec<Vec<u8>>, tokens: Vec<Vec<u8>>, tolerance: Duration },
    /// FedEx Advanced Integrated Visibility webhooks (developer.fedex.com,
    /// shipment-visibility-webhook, "Validation process"): `fdx-signature`,
    /// base64 HMAC-SHA256 of the body keyed with the project's security token
    /// (the page's prose says "SHA256(token + payload)"; its Java sample, followed
    /// here, is a plain HMAC). FedEx publishes its source range, 20.65.16.22/31
    /// ("Business rules"): put it in the source's `allow` list.
    FedEx { secrets: Vec<Vec<u8>> },
    /// UPS Track Alert (UPS's OpenAPI, `UPS-API/api-documentation`,
    /// `UPSTrackAlert.yaml`): v1 subscriptions echo the subscription's
    /// `credential`, an opaque string, in a `credential` header, compared as a
    /// whole. v2 has UPS fetch an OAuth token from the subscriber's own token
    /// endpoint; Waymark runs no token endpoint, so for v2 it accepts
    /// `Authorization: Bearer <token>` equal to a configured credential (a
    /// static token issued by the endpoint UPS is given).
    Ups { credentials: Vec<Vec<u8>> },
    /// DHL Shipment Tracking Unified Push (DHL's published request collection):
    /// the subscription's `hook.authentication` `{"type": "ApiKeyAuthentication",
    /// "header": NAME, "token": VALUE}`; DHL sends `NAME: VALUE` with each push.
    Dhl { header: String, keys: Vec<Vec<u8>> },
    /// USPS Subscriptions-Tracking (USPS APIs v3): the subscription's optional
    /// 32-character secret, and an `X-HMAC` header on each notification. Known
    /// only from third-party material, not USPS's pages: the algorithm and
    /// encoding are not documented there. Taken as HMAC-SHA256 of the body, in
    /// base64 or hex (both are accepted; both are a full-length MAC).
    Usps { secrets: Vec<Vec<u8>> },
    /// ShipStation API / ShipEngine (docs.shipstation.com, "Webhooks
    /// validation"): RSA-SHA256 with the key named by
    /// `x-shipengine-rsa-sha256-key-id` among the keys of ShipEngine's JWKS
    /// (`https://api.shipengine.com/jwks`), the signature in
    /// `x-shipengine-rsa-sha256-signature`, the time in `x-shipengine-timestamp`,
    /// refused more than 5 minutes off. The headers and the window are
    /// documented; the signed message (`timestamp + "." + body`), PKCS#1 v1.5
    /// padding and base64 are from third-party verifiers (the page's later
    /// steps were not available).
    ShipEngine { keys: Vec<(String, RsaPublicKey)>, tolerance: Duration },
    /// See [`GenericHmac`].
    Hmac { spec: GenericHmac, secrets: Vec<Vec<u8>>, tolerance: Duration },
    /// No authentication (only behind an address allowlist or another gate).
    None,
}

impl std::fmt::Debug for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets: the name and how many there are.
        let (name, count) = match self {
            Scheme::EasyPost { secrets, basic, .. } => ("easypost", secrets.len() + basic.len()),
            Scheme::AfterShip { secrets } => ("aftership", secrets.len()),
            Scheme::Shippo { secrets, tokens, .. } => ("shippo", secrets.len() + tokens.len()),
            Scheme::FedEx { secrets } => ("fedex", secrets.len()),
            Scheme::Ups { credentials } => ("ups", credentials.len()),
            Scheme::Dhl { keys, .. } => ("dhl", keys.len()),
            Scheme::Usps { secrets } => ("usps", secrets.len()),
            Scheme::ShipEngine { keys, .. } => ("shipengine", keys.len()),
            Scheme::Hmac { secrets, .. } => ("hmac", secrets.len()),
            Scheme::None => ("none", 0),
        };
        write!(f, "Scheme::{name}({count} secret(s))")
    }
}

/// EasyPost's key: the secret NFKD-normalized, as UTF-8 (the client libraries
/// do this; "sécret" signs differently from its NFC form).
pub fn easypost_key(secret: &str) -> Vec<u8> {
    secret.nfkd().collect::<String>().into_bytes()
}

impl Scheme {
    /// The scheme's name, as configured.
    pub fn name(&self) -> &'static str {
        match self {
            Scheme::EasyPost { .. } => "easypost",
            Scheme::AfterShip { .. } => "aftership",
            Scheme::Shippo { .. } => "shippo",
            Scheme::FedEx { .. } => "fedex",
            Scheme::Ups { .. } => "ups",
            Scheme::Dhl { .. } => "dhl",
            Scheme::Usps { .. } => "usps",
            Scheme::ShipEngine { .. } => "shipengine",
            Scheme::Hmac { .. } => "hmac",
            Scheme::None => "none",
        }
    }

    /// Verify a request at `now_unix` (seconds since the epoch, the server's clock).
    pub fn verify(&self, request: &Presented<'_>, now_unix: i64) -> Result<Verified, AuthFailure> {
        let headers = request.headers;
        match self {
            Scheme::EasyPost { secrets, basic, tolerance } => {
                if let Some(signature) = headers.get("x-hmac-signature-v2") {
                    return easypost_v2(secrets, request, signature, *tolerance, now_unix);
                }
                if let Some(value) = headers.get("x-hmac-signature") {
                    let hex = value.trim().strip_prefix("hmac-sha256-hex=").ok_or(AuthFailure::Malformed)?;
                    let mac = decode_hex(hex).ok_or(AuthFailure::Malformed)?;
                    return verify_any(HmacAlgorithm::Sha256, secrets, &[request.body], &mac).map(|()| Verified::default());
                }
                if let Some(presented) = basic_credentials(headers) {
                    return match_credential(basic, presented.as_bytes()).map(|()| Verified::default());
                }
                Err(AuthFailure::Missing)
            }
            Scheme::AfterShip { secrets } => {
                let value = headers
                    .get("aftership-hmac-sha256")
                    .or_else(|| headers.get("as-signature-hmac-sha256"))
                    .or_else(|| headers.get("am-webhook-signature").map(|v| v.trim().strip_prefix("hmac-sha256=").unwrap_or(v)))
                    .ok_or(AuthFailure::Missing)?;
                let mac = decode_base64(value).ok_or(AuthFailure::Malformed)?;
                verify_any(HmacAlgorithm::Sha256, secrets, &[request.body], &mac).map(|()| Verified::default())
            }
            Scheme::Shippo { secrets, tokens, tolerance } => {
                if let Some(value) = headers.get("shippo-auth-signature") {
                    let (timestamp, macs) = parse_shippo_signature(value).ok_or(AuthFailure::Malformed)?;
                    check_time(timestamp, *tolerance, now_unix)?;
                    let stamp = timestamp.to_string();
                    let message: [&[u8]; 3] = [stamp.as_bytes(), b".", request.body];
                    for mac in &macs {
                        if verify_any(HmacAlgorithm::Sha256, secrets, &message, mac).is_ok() {
                            return Ok(Verified { replay_key: Some(replay_key(&[b"shippo", value.as_bytes()])) });
                        }
                    }
                    return Err(AuthFailure::BadSignature);
                }
                if let Some(token) = request.query.and_then(|q| query_value(q, "token")) {
                    return match_credential(tokens, token.as_bytes()).map(|()| Verified::default());
                }
                Err(AuthFailure::Missing)
            }
            Scheme::FedEx { secrets } => {
                let value = headers.get("fdx-signature").ok_or(AuthFailure::Missing)?;
                let mac = decode_base64(value).ok_or(AuthFailure::Malformed)?;
                verify_any(HmacAlgorithm::Sha256, secrets, &[request.body], &mac).map(|()| Verified::default())
            }
            Scheme::Ups { credentials } => {
                let presented = headers
                    .get("credential")
                    .or_else(|| headers.get("authorization").and_then(|v| v.trim().strip_prefix("Bearer ")))
                    .or_else(|| headers.get("x-api-key"))
                    .ok_or(AuthFailure::Missing)?;
                match_credential(credentials, presented.trim().as_bytes()).map(|()| Verified::default())
            }
            Scheme::Dhl { header, keys } => {
                let presented = headers.get(header).ok_or(AuthFailure::Missing)?;
                match_credential(keys, presented.trim().as_bytes()).map(|()| Verified::default())
            }
            Scheme::Usps { secrets } => {
                let value = headers.get("x-hmac").ok_or(AuthFailure::Missing)?;
                // A hex MAC also reads as base64 (of other bytes): try both readings.
                let readings: Vec<Vec<u8>> = [decode_base64(value), decode_hex(value.trim())].into_iter().flatten().collect();
                if readings.is_empty() {
                    return Err(AuthFailure::Malformed);
                }
                let matched = readings.iter().any(|mac| verify_any(HmacAlgorithm::Sha256, secrets, &[request.body], mac).is_ok());
                if matched {
                    Ok(Verified::default())
                } else {
                    Err(AuthFailure::BadSignature)
                }
            }
            Scheme::ShipEngine { keys, tolerance } => shipengine(keys, request, *tolerance, now_unix),
            Scheme::Hmac { spec, secrets, tolerance } => generic(spec, secrets, request, *tolerance, now_unix),
            Scheme::None => Ok(Verified::default()),
        }
    }
}

/// EasyPost's v2 signature. EasyPost's support article "Webhook HMAC
/// Validation" names the headers: `x-hmac-signature-v2`, `x-timestamp` (RFC
/// 2822, `Tue, 19 Aug 2025 20:37:09 -0000`) and `x-path`, checked against a
/// timestamp window. No official client library verifies v2 yet; the message,
/// `timestamp + METHOD + path + body` without separators, HMAC-SHA256 in
/// `hmac-sha256-hex=<hex>`, is what third-party verifiers agree on. The key is
/// NFKD-normalized as for v1 (the same for ASCII secrets). `x-path` must be the
/// path the request came to, so a signature for one endpoint does not pass at
/// another.
fn easypost_v2(secrets: &[Vec<u8>], request: &Presented<'_>, signature: &str, tolerance: Duration, now_unix: i64) -> Result<Verified, AuthFailure> {
    let headers = request.headers;
    let timestamp = headers.get("x-timestamp").ok_or(AuthFailure::Missing)?;
    let path = headers.get("x-path").ok_or(AuthFailure::Missing)?;
    if path != request.path {
        return Err(AuthFailure::BadSignature);
    }
    check_time(parse_timestamp(timestamp).ok_or(AuthFailure::Malformed)?, tolerance, now_unix)?;
    let hex = signature.trim().strip_prefix("hmac-sha256-hex=").ok_or(AuthFailure::Malformed)?;
    let mac = decode_hex(hex).ok_or(AuthFailure::Malformed)?;
    let message: [&[u8]; 4] = [timestamp.as_bytes(), request.method.as_bytes(), path.as_bytes(), request.body];
    verify_any(HmacAlgorithm::Sha256, secrets, &message, &mac)?;
    Ok(Verified { replay_key: Some(replay_key(&[b"easypost-v2", signature.as_bytes()])) })
}

fn shipengine(keys: &[(String, RsaPublicKey)], request: &Presented<'_>, tolerance: Duration, now_unix: i64) -> Result<Verified, AuthFailure> {
    let headers = request.headers;
    let signature = headers.get("x-shipengine-rsa-sha256-signature").ok_or(AuthFailure::Missing)?;
    let key_id = headers.get("x-shipengine-rsa-sha256-key-id").ok_or(AuthFailure::Missing)?;
    let timestamp = headers.get("x-shipengine-timestamp").ok_or(AuthFailure::Missing)?;
    check_time(parse_timestamp(timestamp).ok_or(AuthFailure::Malformed)?, tolerance, now_unix)?;
    let key = keys.iter().find(|(id, _)| id == key_id.trim()).map(|(_, key)| key).ok_or(AuthFailure::UnknownKey)?;
    let raw = decode_base64(signature).ok_or(AuthFailure::Malformed)?;
    let signature = RsaSignature::try_from(raw.as_slice()).map_err(|_| AuthFailure::Malformed)?;
    let mut message = Vec::with_capacity(timestamp.len() + 1 + request.body.len());
    message.extend_from_slice(timestamp.as_bytes());
    message.push(b'.');
    message.extend_from_slice(request.body);
    VerifyingKey::<Sha256>::new(key.clone()).verify(&message, &signature).map_err(|_| AuthFailure::BadSignature)?;
    Ok(Verified { replay_key: Some(replay_key(&[b"shipengine", key_id.as_bytes(), &raw])) })
}

fn generic(spec: &GenericHmac, secrets: &[Vec<u8>], request: &Presented<'_>, tolerance: Duration, now_unix: i64) -> Result<Verified, AuthFailure> {
    let headers = request.headers;
    let value = headers.get(&spec.header).ok_or(AuthFailure::Missing)?;
    let encoded = value.trim().strip_prefix(spec.prefix.as_str()).ok_or(AuthFailure::Malformed)?;
    let mac = match spec.encoding {
        Encoding::Hex => decode_hex(encoded),
        Encoding::Base64 => decode_base64(encoded),
    }
    .ok_or(AuthFailure::Malformed)?;
    let timestamp = match &spec.timestamp_header {
        Some(name) => {
            let text = headers.get(name).ok_or(AuthFailure::Missing)?;
            check_time(parse_timestamp(text).ok_or(AuthFailure::Malformed)?, tolerance, now_unix)?;
            Some(text)
        }
        None => None,
    };
    let parts: Vec<&[u8]> = match timestamp {
        Some(t) => vec![t.as_bytes(), spec.separator.as_bytes(), request.body],
        None => vec![request.body],
    };
    verify_any(spec.algorithm, secrets, &parts, &mac)?;
    Ok(Verified { replay_key: timestamp.map(|_| replay_key(&[b"hmac", value.as_bytes()])) })
}

/// The MAC of `parts` (concatenated) under any of `secrets` equals `mac`
/// (checked in constant time by the `hmac` crate).
fn verify_any(algorithm: HmacAlgorithm, secrets: &[Vec<u8>], parts: &[&[u8]], mac: &[u8]) -> Result<(), AuthFailure> {
    fn one<M: Mac + hmac::digest::KeyInit>(secret: &[u8], parts: &[&[u8]], mac: &[u8]) -> bool {
        let Ok(mut hmac) = <M as hmac::digest::KeyInit>::new_from_slice(secret) else { return false };
        for part in parts {
            hmac.update(part);
        }
        hmac.verify_slice(mac).is_ok()
    }
    let mut matched = false;
    // Every secret is tried (no early exit), so the time does not say which matched.
    for secret in secrets {
        matched |= match algorithm {
            HmacAlgorithm::Sha256 => one::<Hmac<Sha256>>(secret, parts, mac),
            HmacAlgorithm::Sha512 => one::<Hmac<Sha512>>(secret, parts, mac),
        };
    }
    if matched {
        Ok(())
    } else {
        Err(AuthFailure::BadSignature)
    }
}

/// A shared credential equals one configured, compared in constant time
/// through BLAKE3 digests (equal length whatever the credential's).
fn match_credential(configured: &[Vec<u8>], presented: &[u8]) -> Result<(), AuthFailure> {
    if presented.is_empty() {
        return Err(AuthFailure::Missing);
    }
    let presented = blake3::hash(presented);
    let mut matched = subtle::Choice::from(0);
    for credential in configured {
        matched |= blake3::hash(credential).as_bytes().ct_eq(presented.as_bytes());
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(AuthFailure::BadCredential)
    }
}

/// `Authorization: Basic <base64 user:password>` decoded to `user:password`.
fn basic_credentials(headers: &dyn Headers) -> Option<String> {
    let value = headers.get("authorization")?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    String::from_utf8(decode_base64(encoded)?).ok()
}

/// Shippo's header: `t=<unix seconds>,v1=<hex>[,v1=<hex>...]` (several `v1`
/// while Shippo rolls a secret). `None` when it cannot be read.
pub fn parse_shippo_signature(value: &str) -> Option<(i64, Vec<Vec<u8>>)> {
    let mut timestamp = None;
    let mut macs = Vec::new();
    for part in value.split(',') {
        let (name, text) = part.trim().split_once('=')?;
        match name.trim() {
            "t" => timestamp = Some(text.trim().parse::<i64>().ok()?),
            "v1" => macs.push(decode_hex(text.trim())?),
            _ => {} // later versions: ignored, as Stripe-style verifiers do
        }
    }
    match (timestamp, macs.is_empty()) {
        (Some(t), false) => Some((t, macs)),
        _ => None,
    }
}

/// A timestamp header: unix seconds, unix milliseconds (13+ digits), RFC 3339
/// or RFC 2822.
pub fn parse_timestamp(text: &str) -> Option<i64> {
    let text = text.trim();
    if !text.is_empty() && text.len() <= 18 && text.bytes().all(|b| b.is_ascii_digit()) {
        let n: i64 = text.parse().ok()?;
        return Some(if text.len() >= 13 { n / 1000 } else { n });
    }
    chrono::DateTime::parse_from_rfc3339(text).or_else(|_| chrono::DateTime::parse_from_rfc2822(text)).ok().map(|t| t.timestamp())
}

/// Within `tolerance` of `now_unix`, either way.
fn check_time(timestamp: i64, tolerance: Duration, now_unix: i64) -> Result<(), AuthFailure> {
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if timestamp < now_unix.saturating_sub(tolerance) {
        Err(AuthFailure::Stale)
    } else if timestamp > now_unix.saturating_add(tolerance) {
        Err(AuthFailure::Future)
    } else {
        Ok(())
    }
}

/// `name`'s value in a query string (not percent-decoded: tokens are URL-safe).
fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').filter_map(|pair| pair.split_once('=')).find(|(n, _)| *n == name).map(|(_, v)| v)
}

fn replay_key(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    *hasher.finalize().as_bytes()
}

/// Lower- or upper-case hex.
pub fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || bytes.len() % 2 != 0 {
        return None;
    }
    bytes
        .chunks(2)
        .map(|pair| {
            let digit = |b: u8| (b as char).to_digit(16);
            Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
        })
        .collect()
}

/// Standard base64, padded or not.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
        .ok()
        .filter(|bytes| !bytes.is_empty())
}

/// Signatures accepted within their tolerance, to refuse the same one twice.
///
/// A signature is reserved when its request is verified and forgotten again if
/// the record does not reach the broker (the provider's retry of a request
/// answered 503 must pass); it stays until its timestamp falls out of the
/// tolerance, after which the timestamp check refuses it anyway. Bounded: at
/// most `capacity` entries; when full, the oldest expiry goes first.
#[derive(Debug)]
pub struct ReplayGuard {
    capacity: usize,
    expiries: std::collections::BTreeSet<(i64, [u8; 32])>,
    seen: std::collections::HashMap<[u8; 32], i64>,
}

impl ReplayGuard {
    pub fn new(capacity: usize) -> Self {
        ReplayGuard { capacity: capacity.max(1), expiries: Default::default(), seen: Default::default() }
    }

    /// Reserve `key` until `expires_unix`; `Err(Replayed)` when it is held.
    pub fn reserve(&mut self, key: [u8; 32], expires_unix: i64, now_unix: i64) -> Result<(), AuthFailure> {
        if self.seen.get(&key).is_some_and(|&expiry| expiry >= now_unix) {
            return Err(AuthFailure::Replayed);
        }
        // Expired entries go, and the oldest while full.
        while let Some(&(expiry, old)) = self.expiries.first() {
            if expiry >= now_unix && self.seen.len() < self.capacity {
                break;
            }
            self.expiries.pop_first();
            self.seen.remove(&old);
        }
        self.seen.insert(key, expires_unix);
        self.expiries.insert((expires_unix, key));
        Ok(())
    }

    /// Forget `key` (its record did not reach the broker).
    pub fn release(&mut self, key: &[u8; 32]) {
        if let Some(expiry) = self.seen.remove(key) {
            self.expiries.remove(&(expiry, *key));
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_765_000_000;

    fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
        let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new_from_slice(key).unwrap();
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn check(scheme: &Scheme, headers: &[(&str, &str)], body: &[u8]) -> Result<Verified, AuthFailure> {
        scheme.verify(&Presented { method: "POST", path: "/webhooks/x", query: None, headers: &HeaderList(headers), body }, NOW)
    }

    /// EasyPost's published test vector (`EasyPost/examples`,
    /// `official/fixtures/client-library-fixtures.json`, key `webhooks`, over
    /// `official/fixtures/event-body.json`), which every client library tests.
    #[test]
    fn easypost_published_test_vector() {
        let body = include_bytes!("../../fixtures/easypost/client_library_event_body.json");
        let scheme = Scheme::EasyPost { secrets: vec![easypost_key("sécret")], basic: vec![], tolerance: Duration::from_secs(300) };
        let header = "hmac-sha256-hex=38f3f53c103713df81616a0a186d77141957323ec21d5fe9363db93840f527db";
        assert_eq!(check(&scheme, &[("X-Hmac-Signature", header)], body), Ok(Verified::default()));
        // The NFC form of the same secret is another key.
        let nfc = Scheme::EasyPost { secrets: vec!["sécret".as_bytes().to_vec()], basic: vec![], tolerance: Duration::from_secs(300) };
        assert_eq!(check(&nfc, &[("X-Hmac-Signature", header)], body), Err(AuthFailure::BadSignature));
        let mut tampered = body.to_vec();
        tampered.push(b'\n');
        assert_eq!(check(&scheme, &[("X-Hmac-Signature", header)], &tampered), Err(AuthFailure::BadSignature));
        assert_eq!(check(&scheme, &[], body), Err(AuthFailure::Missing));
        assert_eq!(check(&scheme, &[("X-Hmac-Signature", "38f3f5")], body), Err(AuthFailure::Malformed));
    }

    /// EasyPost v2: timestamp + method + path + body. A regression vector
    /// computed independently (Python's hmac) from the construction third-party
    /// verifiers agree on; EasyPost publishes none for v2.
    #[test]
    fn easypost_v2_signs_time_method_path_and_body() {
        let scheme = Scheme::EasyPost { secrets: vec![b"A1B2C3".to_vec()], basic: vec![], tolerance: Duration::from_secs(300) };
        let stamp = "Tue, 19 Aug 2025 20:37:09 -0000";
        let signed_at = 1_755_635_829;
        let headers = [
            ("x-hmac-signature-v2", "hmac-sha256-hex=dba1b4ba356742b0cd773626a3a8c9d3c75927778b0f88af018e7758052ec4e8"),
            ("x-timestamp", stamp),
            ("x-path", "/webhooks/easypost"),
        ];
        let request = |path: &'static str, headers: &'static [(&'static str, &'static str)], now| {
            let list = HeaderList(headers);
            scheme.verify(&Presented { method: "POST", path, query: None, headers: &list, body: br#"{"description":"tracker.updated"}"# }, now)
        };
        let headers: &'static [(&str, &str)] = Box::leak(Box::new(headers));
        assert!(request("/webhooks/easypost", headers, signed_at).unwrap().replay_key.is_some());
        assert_eq!(request("/webhooks/other", headers, signed_at), Err(AuthFailure::BadSignature), "x-path must be where it came");
        assert_eq!(request("/webhooks/easypost", headers, signed_at + 301), Err(AuthFailure::Stale));
        assert_eq!(request("/webhooks/easypost", headers, signed_at - 301), Err(AuthFailure::Future));
        assert_eq!(request("/webhooks/easypost", &headers[..2], signed_at), Err(AuthFailure::Missing));
    }

    #[test]
    fn generic_hmac_with_prefix_base64_sha512_and_timestamp() {
        let spec = GenericHmac {
            header: "x-sig".into(),
            algorithm: HmacAlgorithm::Sha512,
            encoding: Encoding::Base64,
            prefix: "v1=".into(),
            timestamp_header: Some("x-ts".into()),
            separator: ":".into(),
        };
        let scheme = Scheme::Hmac { spec, secrets: vec![b"k".to_vec()], tolerance: Duration::from_secs(60) };
        let mut mac = <Hmac<Sha512> as hmac::digest::KeyInit>::new_from_slice(b"k").unwrap();
        mac.update(format!("{NOW}:{{}}").as_bytes());
        let signature = format!("v1={}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
        let stamp = NOW.to_string();
        assert!(check(&scheme, &[("x-sig", &signature), ("x-ts", &stamp)], b"{}").unwrap().replay_key.is_some());
        assert_eq!(check(&scheme, &[("x-sig", &signature[3..]), ("x-ts", &stamp)], b"{}"), Err(AuthFailure::Malformed), "the prefix is required");
        assert_eq!(check(&scheme, &[("x-sig", &signature)], b"{}"), Err(AuthFailure::Missing));
    }

    #[test]
    fn usps_takes_base64_or_hex() {
        let scheme = Scheme::Usps { secrets: vec![b"0123456789abcdef0123456789abcdef".to_vec()] };
        let hex = hmac_hex(b"0123456789abcdef0123456789abcdef", &[b"{}"]);
        let raw = decode_hex(&hex).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
        assert!(check(&scheme, &[("X-HMAC", &hex)], b"{}").is_ok());
        assert!(check(&scheme, &[("X-HMAC", &b64)], b"{}").is_ok());
        assert_eq!(check(&scheme, &[("X-HMAC", &b64)], b"{ }"), Err(AuthFailure::BadSignature));
    }

    #[test]
    fn shipengine_verifies_rsa_over_time_and_body() {
        use rsa::signature::{SignatureEncoding, Signer};
        let private = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 1024).unwrap();
        let scheme = Scheme::ShipEngine { keys: vec![("k1".into(), private.to_public_key())], tolerance: Duration::from_secs(300) };
        let stamp = "2025-12-06T05:46:40Z";
        let signature = rsa::pkcs1v15::SigningKey::<Sha256>::new(private).sign(format!("{stamp}.{{}}").as_bytes()).to_bytes();
        let encoded = base64::engine::general_purpose::STANDARD.encode(signature);
        let headers = |kid: &'static str| -> Vec<(&'static str, String)> {
            vec![("x-shipengine-rsa-sha256-key-id", kid.into()), ("x-shipengine-rsa-sha256-signature", encoded.clone()), ("x-shipengine-timestamp", stamp.into())]
        };
        let verify = |kid, body: &[u8]| {
            let owned = headers(kid);
            let pairs: Vec<(&str, &str)> = owned.iter().map(|(n, v)| (*n, v.as_str())).collect();
            check(&scheme, &pairs, body)
        };
        assert!(verify("k1", b"{}").unwrap().replay_key.is_some());
        assert_eq!(verify("k1", b"{ }"), Err(AuthFailure::BadSignature));
        assert_eq!(verify("k2", b"{}"), Err(AuthFailure::UnknownKey));
    }

    #[test]
    fn a_rotated_secret_is_accepted_beside_the_old_one() {
        let scheme = Scheme::AfterShip { secrets: vec![b"old".to_vec(), b"new".to_vec()] };
        for key in [&b"old"[..], b"new"] {
            let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new_from_slice(key).unwrap();
            mac.update(b"{}");
            let encoded = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            assert!(check(&scheme, &[("aftership-hmac-sha256", &encoded)], b"{}").is_ok());
        }
    }

    #[test]
    fn shippo_signature_checks_time_and_body() {
        let scheme = Scheme::Shippo { secrets: vec![b"s3cret".to_vec()], tokens: vec![b"tok".to_vec()], tolerance: Duration::from_secs(300) };
        let sign = |t: i64, body: &[u8]| format!("t={t},v1={}", hmac_hex(b"s3cret", &[t.to_string().as_bytes(), b".", body]));
        let ok = check(&scheme, &[("Shippo-Auth-Signature", &sign(NOW, b"{}"))], b"{}").unwrap();
        assert!(ok.replay_key.is_some());
        assert_eq!(check(&scheme, &[("Shippo-Auth-Signature", &sign(NOW - 301, b"{}"))], b"{}"), Err(AuthFailure::Stale));
        assert_eq!(check(&scheme, &[("Shippo-Auth-Signature", &sign(NOW + 301, b"{}"))], b"{}"), Err(AuthFailure::Future));
        assert_eq!(check(&scheme, &[("Shippo-Auth-Signature", &sign(NOW, b"{}"))], b"{ }"), Err(AuthFailure::BadSignature));
        assert_eq!(check(&scheme, &[("Shippo-Auth-Signature", "v1=00")], b"{}"), Err(AuthFailure::Malformed));
        let query = |q| scheme.verify(&Presented { method: "POST", path: "/", query: Some(q), headers: &HeaderList(&[]), body: b"{}" }, NOW);
        assert!(query("token=tok").is_ok());
        assert_eq!(query("token=tok2"), Err(AuthFailure::BadCredential));
    }

    #[test]
    fn credentials_are_whole_strings() {
        let scheme = Scheme::Ups { credentials: vec![b"opaque-credential".to_vec()] };
        assert!(check(&scheme, &[("credential", "opaque-credential")], b"").is_ok());
        assert_eq!(check(&scheme, &[("credential", "opaque-credentia")], b""), Err(AuthFailure::BadCredential));
        assert_eq!(check(&scheme, &[("credential", "")], b""), Err(AuthFailure::Missing));
        assert_eq!(check(&scheme, &[], b""), Err(AuthFailure::Missing));
    }

    #[test]
    fn replay_guard_refuses_a_held_signature_and_forgets_released_and_expired_ones() {
        let mut guard = ReplayGuard::new(2);
        assert!(guard.reserve([1; 32], NOW + 300, NOW).is_ok());
        assert_eq!(guard.reserve([1; 32], NOW + 300, NOW), Err(AuthFailure::Replayed));
        guard.release(&[1; 32]);
        assert!(guard.reserve([1; 32], NOW + 300, NOW).is_ok(), "released: the provider's retry passes");
        assert!(guard.reserve([2; 32], NOW + 10, NOW).is_ok());
        assert!(guard.reserve([3; 32], NOW + 400, NOW + 20).is_ok(), "[2] expired and made room");
        assert_eq!(guard.len(), 2);
        assert!(guard.reserve([4; 32], NOW + 500, NOW + 20).is_ok(), "full: the oldest expiry goes");
        assert_eq!(guard.len(), 2);
        assert_eq!(guard.reserve([3; 32], NOW + 400, NOW + 20), Err(AuthFailure::Replayed));
    }

    #[test]
    fn timestamps_in_every_spelling() {
        assert_eq!(parse_timestamp("1765000000"), Some(1_765_000_000));
        assert_eq!(parse_timestamp("1765000000123"), Some(1_765_000_000));
        assert_eq!(parse_timestamp("2025-12-06T05:46:40Z"), Some(1_765_000_000));
        assert_eq!(parse_timestamp("Sat, 06 Dec 2025 05:46:40 -0000"), Some(1_765_000_000));
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(parse_timestamp(""), None);
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let scheme = Scheme::Dhl { header: "x-api-key".into(), keys: vec![b"hunter2-hunter2".to_vec()] };
        let text = format!("{scheme:?}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
