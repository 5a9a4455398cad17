//! RSA keys from a JSON Web Key Set (RFC 7517): ShipEngine publishes the keys
//! its webhooks are signed with as one, `https://api.shipengine.com/jwks`.

use std::path::Path;

use base64::Engine as _;
use rsa::{BigUint, RsaPublicKey};

/// The RSA keys of a JWKS, by key id. Keys of other types are skipped; a set
/// without a usable RSA key is an error.
pub fn parse(text: &str) -> Result<Vec<(String, RsaPublicKey)>, String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<Key>,
    }
    #[derive(serde::Deserialize)]
    struct Key {
        kty: String,
        kid: Option<String>,
        n: Option<String>,
        e: Option<String>,
    }
    let set: Set = serde_json::from_str(text).map_err(|e| format!("not a JWKS ({{\"keys\": [...]}}): {e}"))?;
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut keys = Vec::new();
    for (i, key) in set.keys.into_iter().enumerate() {
        if key.kty != "RSA" {
            continue;
        }
        let (Some(kid), Some(n), Some(e)) = (key.kid, key.n, key.e) else {
            return Err(format!("key {i}: an RSA key needs kid, n and e"));
        };
        let number = |name: &str, text: &str| {
            url.decode(text.trim_end_matches('=')).map(|bytes| BigUint::from_bytes_be(&bytes)).map_err(|e| format!("key {kid}: {name} is not base64url: {e}"))
        };
        let public = RsaPublicKey::new(number("n", &n)?, number("e", &e)?).map_err(|e| format!("key {kid}: not a usable RSA key: {e}"))?;
        keys.push((kid, public));
    }
    if keys.is_empty() {
        return Err("holds no RSA key".into());
    }
    Ok(keys)
}

/// [`parse`] of a file.
pub fn read_file(path: &Path) -> Result<Vec<(String, RsaPublicKey)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// A public key as a JWK (for tests and tools that publish their own keys).
pub fn to_jwk(kid: &str, key: &RsaPublicKey) -> serde_json::Value {
    use rsa::traits::PublicKeyParts;
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    serde_json::json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": url.encode(key.n().to_bytes_be()), "e": url.encode(key.e().to_bytes_be())})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_bad_sets_say_why() {
        // A small key: the test is about the encoding, not the strength.
        let private = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 1024).unwrap();
        let public = private.to_public_key();
        let set = serde_json::json!({"keys": [{"kty": "EC", "kid": "ec"}, to_jwk("k1", &public)]}).to_string();
        let keys = parse(&set).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].0, "k1");
        assert_eq!(keys[0].1, public);
        assert!(parse("{}").unwrap_err().contains("not a JWKS"));
        assert!(parse(r#"{"keys":[]}"#).unwrap_err().contains("no RSA key"));
        assert!(parse(r#"{"keys":[{"kty":"RSA","kid":"x","n":"!!","e":"AQAB"}]}"#).unwrap_err().contains("base64url"));
    }
}
