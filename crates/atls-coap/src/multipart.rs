//! `application/multipart-core` (RFC 8710), which the draft's §7 allows for
//! mixing media types in one payload: a CBOR array of alternating
//! Content-Format numbers and byte strings.
//!
//! The server accepts a flight in it: the parts of the ATLS Content-Format
//! are the flight, concatenated in order; parts of other formats are
//! ignored (no other media type has a meaning on `/.well-known/atls`). It
//! never sends it: an ATLS answer is one media type, and a plain
//! application/atls payload is smaller and readable by every peer.

use ciborium::Value;

/// The bytes of every `format` part of a multipart-core payload, in order.
pub fn atls_parts(payload: &[u8], format: u16) -> Result<Vec<u8>, &'static str> {
    let value: Value = ciborium::de::from_reader(payload).map_err(|_| "multipart-core: not CBOR")?;
    let Value::Array(items) = value else {
        return Err("multipart-core: not a CBOR array");
    };
    if items.len() % 2 != 0 {
        return Err("multipart-core: an odd number of items");
    }
    let mut flight = Vec::new();
    for pair in items.chunks(2) {
        let [Value::Integer(cf), part] = pair else {
            return Err("multipart-core: a part without its Content-Format");
        };
        let cf =
            u16::try_from(i128::from(*cf)).map_err(|_| "multipart-core: a Content-Format out of range")?;
        match part {
            Value::Bytes(bytes) if cf == format => flight.extend_from_slice(bytes),
            Value::Bytes(_) | Value::Null => {}
            _ => return Err("multipart-core: a part that is not a byte string"),
        }
    }
    if flight.is_empty() {
        return Err("multipart-core: no application/atls part");
    }
    Ok(flight)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(items: Vec<Value>) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(&Value::Array(items), &mut out).expect("cbor");
        out
    }

    #[test]
    fn the_atls_parts_are_the_flight() {
        let payload = encode(vec![
            Value::Integer(65000.into()),
            Value::Bytes(vec![1, 2]),
            Value::Integer(0.into()),
            Value::Bytes(b"text".to_vec()),
            Value::Integer(65000.into()),
            Value::Bytes(vec![3]),
        ]);
        assert_eq!(atls_parts(&payload, 65000), Ok(vec![1, 2, 3]));
        assert!(atls_parts(&payload, 65001).is_err(), "no part of that format");
        assert!(atls_parts(&[0xFF], 65000).is_err());
        assert!(atls_parts(&encode(vec![Value::Integer(65000.into())]), 65000).is_err());
        assert!(atls_parts(
            &encode(vec![Value::Text("x".into()), Value::Bytes(vec![1])]),
            65000
        )
        .is_err());
        assert!(atls_parts(
            &encode(vec![Value::Integer((-1).into()), Value::Bytes(vec![1])]),
            65000
        )
        .is_err());
    }
}
