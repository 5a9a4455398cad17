//! Typed access to JSON fields with errors that name the field path, so a dead
//! letter says exactly which field was wrong.

use serde_json::Value;

use crate::error::RecordError;

/// A JSON value together with the path that led to it (for error messages).
#[derive(Clone, Copy)]
pub struct At<'a> {
    pub value: &'a Value,
    pub path: &'a str,
}

/// Child value, `None` when absent or null.
pub fn opt<'a>(parent: &'a Value, key: &str) -> Option<&'a Value> {
    parent.get(key).filter(|v| !v.is_null())
}

/// Optional string field: absent, null or blank is `None`; a number is accepted as
/// its decimal text (carriers flip between the two); other types are an error.
pub fn opt_str(parent: &Value, key: &str, path: &str) -> Result<Option<String>, RecordError> {
    match opt(parent, key) {
        None => Ok(None),
        Some(Value::String(s)) => {
            let trimmed = s.trim();
            Ok((!trimmed.is_empty()).then(|| trimmed.to_string()))
        }
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(RecordError::WrongType { field: join(path, key), expected: "string" }),
    }
}

/// Required string field (non-blank).
pub fn req_str(parent: &Value, key: &str, path: &str) -> Result<String, RecordError> {
    opt_str(parent, key, path)?.ok_or_else(|| RecordError::MissingField(join(path, key)))
}

/// Required object field.
pub fn req_obj<'a>(parent: &'a Value, key: &str, path: &str) -> Result<&'a Value, RecordError> {
    match opt(parent, key) {
        None => Err(RecordError::MissingField(join(path, key))),
        Some(v @ Value::Object(_)) => Ok(v),
        Some(_) => Err(RecordError::WrongType { field: join(path, key), expected: "object" }),
    }
}

/// Optional object field.
pub fn opt_obj<'a>(parent: &'a Value, key: &str, path: &str) -> Result<Option<&'a Value>, RecordError> {
    match opt(parent, key) {
        None => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v)),
        Some(_) => Err(RecordError::WrongType { field: join(path, key), expected: "object" }),
    }
}

/// Optional array field: absent or null is an empty slice.
pub fn opt_array<'a>(parent: &'a Value, key: &str, path: &str) -> Result<&'a [Value], RecordError> {
    match opt(parent, key) {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(RecordError::WrongType { field: join(path, key), expected: "array" }),
    }
}

/// The root must be an object.
pub fn root_obj(value: &Value) -> Result<&Value, RecordError> {
    if value.is_object() {
        Ok(value)
    } else {
        Err(RecordError::WrongType { field: "$".into(), expected: "object" })
    }
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// ISO 3166-1 alpha-2 country or nothing: anything else is not a country code.
pub fn country_code(raw: Option<String>) -> Option<String> {
    raw.map(|c| c.trim().to_ascii_uppercase()).filter(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_numbers_nulls_and_wrong_types() {
        let v = json!({"a": " x ", "n": 12, "z": null, "b": "  ", "o": {}});
        assert_eq!(opt_str(&v, "a", "r").unwrap().as_deref(), Some("x"));
        assert_eq!(opt_str(&v, "n", "r").unwrap().as_deref(), Some("12"));
        assert_eq!(opt_str(&v, "z", "r").unwrap(), None);
        assert_eq!(opt_str(&v, "b", "r").unwrap(), None);
        assert_eq!(
            opt_str(&v, "o", "r").unwrap_err(),
            RecordError::WrongType { field: "r.o".into(), expected: "string" }
        );
        assert_eq!(req_str(&v, "missing", "").unwrap_err(), RecordError::MissingField("missing".into()));
    }

    #[test]
    fn country_codes() {
        assert_eq!(country_code(Some(" us ".into())).as_deref(), Some("US"));
        assert_eq!(country_code(Some("USA".into())), None);
    }
}
