//! Values in the message: one JSON value per column, exact for every value
//! [`super::check`] lets through (see the table in [`super`]).
//!
//! Written by hand (this runs once per column per row) and read through a
//! `serde` seed that knows the column's type, so nothing goes through an
//! intermediate JSON tree. Floats are written in their shortest form that
//! reads back to the same bits (`serde_json` with `float_roundtrip`), with
//! `NaN` and the infinities as strings, since JSON has no such numbers.

use std::fmt;

use base64::Engine as _;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};

use super::{Array, PgType, Value, time};

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Writes `value` (of a column of type `ty`) as its JSON form. Only values
/// that passed [`super::check`] reach here; anything else is written as
/// `null`, which the decoder refuses for a column that holds none.
pub fn write(out: &mut Vec<u8>, ty: &PgType, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
        Value::Float4(x) => float(out, f64::from(*x), |out| serde_json::to_writer(out, x)),
        Value::Float8(x) => float(out, *x, |out| serde_json::to_writer(out, x)),
        Value::Numeric(s) | Value::Text(s) => string(out, s),
        Value::Bytea(b) => {
            out.push(b'"');
            out.extend_from_slice(BASE64.encode(b).as_bytes());
            out.push(b'"');
        }
        Value::Uuid(u) => {
            out.push(b'"');
            out.extend_from_slice(super::uuid_text(u).as_bytes());
            out.push(b'"');
        }
        Value::Date(d) => match time::unix_days(*d) {
            Ok(days) => {
                out.push(b'"');
                time::write_date(out, days);
                out.push(b'"');
            }
            Err(_) => out.extend_from_slice(b"null"),
        },
        Value::Timestamp(us) => match time::unix_micros(*us) {
            Ok(us) => {
                out.push(b'"');
                time::write_time(out, us);
                out.push(b'"');
            }
            Err(_) => out.extend_from_slice(b"null"),
        },
        Value::Array(a) => {
            let element = ty.element().unwrap_or(ty);
            out.push(b'[');
            for (i, e) in a.elements.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(out, element, e);
            }
            out.push(b']');
        }
        Value::BadText(_) => out.extend_from_slice(b"null"),
    }
}

fn float(out: &mut Vec<u8>, x: f64, finite: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>) {
    if x.is_nan() {
        out.extend_from_slice(b"\"NaN\"");
    } else if x.is_infinite() {
        out.extend_from_slice(if x > 0.0 { b"\"Infinity\"" } else { b"\"-Infinity\"" });
    } else {
        finite(out).expect("writing a finite float to a Vec cannot fail");
    }
}

/// A JSON string (serde_json does the escaping).
pub fn string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing a str to a Vec cannot fail");
}

/// Reads one column's JSON value as a value of type `ty`.
#[derive(Clone, Copy)]
pub struct ValueSeed<'a>(pub &'a PgType);

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a {} value", self.0)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        match self.0 {
            PgType::Bool => Ok(Value::Bool(b)),
            _ => Err(E::invalid_type(de::Unexpected::Bool(b), &self)),
        }
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Value, E> {
        let fits = match self.0 {
            PgType::Int2 => i16::try_from(i).is_ok(),
            PgType::Int4 => i32::try_from(i).is_ok(),
            PgType::Int8 => true,
            PgType::Float4 => return Ok(Value::Float4(i as f32)),
            PgType::Float8 => return Ok(Value::Float8(i as f64)),
            _ => return Err(E::invalid_type(de::Unexpected::Signed(i), &self)),
        };
        if fits { Ok(Value::Int(i)) } else { Err(E::invalid_value(de::Unexpected::Signed(i), &self)) }
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        match i64::try_from(u) {
            Ok(i) => self.visit_i64(i),
            Err(_) => match self.0 {
                PgType::Float4 => Ok(Value::Float4(u as f32)),
                PgType::Float8 => Ok(Value::Float8(u as f64)),
                _ => Err(E::invalid_value(de::Unexpected::Unsigned(u), &self)),
            },
        }
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<Value, E> {
        match self.0 {
            // Parsed as f64 and rounded: exact for the shortest f32 form
            // (f64 has more than twice f32's precision, plus two bits).
            PgType::Float4 => Ok(Value::Float4(x as f32)),
            PgType::Float8 => Ok(Value::Float8(x)),
            _ => Err(E::invalid_type(de::Unexpected::Float(x), &self)),
        }
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        let bad = || E::invalid_value(de::Unexpected::Str(s), &self);
        Ok(match self.0 {
            PgType::Float4 | PgType::Float8 => {
                let x = match s {
                    "NaN" => f64::NAN,
                    "Infinity" => f64::INFINITY,
                    "-Infinity" => f64::NEG_INFINITY,
                    _ => return Err(bad()),
                };
                if *self.0 == PgType::Float4 { Value::Float4(x as f32) } else { Value::Float8(x) }
            }
            PgType::Numeric(_) => {
                if !numeric_text(s) {
                    return Err(bad());
                }
                Value::Numeric(s.to_owned())
            }
            PgType::Bytea => Value::Bytea(BASE64.decode(s).map_err(|_| bad())?),
            PgType::Uuid => Value::Uuid(super::parse_uuid(s).ok_or_else(bad)?),
            PgType::Date => {
                let days = time::parse_date(s.as_bytes()).ok_or_else(bad)?;
                Value::Date(days.checked_sub(time::PG_EPOCH_UNIX_DAYS).ok_or_else(bad)?)
            }
            PgType::Timestamp | PgType::Timestamptz => {
                let us = time::parse_time(s).ok_or_else(bad)?;
                Value::Timestamp(us.checked_sub(time::PG_EPOCH_UNIX_US).ok_or_else(bad)?)
            }
            ty if ty.carried_as_text() => Value::Text(s.to_owned()),
            _ => return Err(E::invalid_type(de::Unexpected::Str(s), &self)),
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let PgType::Array(element) = self.0 else {
            return Err(de::Error::invalid_type(de::Unexpected::Seq, &self));
        };
        let mut elements = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(e) = seq.next_element_seed(ValueSeed(element))? {
            elements.push(e);
        }
        Ok(Value::Array(Array::list(elements)))
    }
}

/// Whether `s` is a numeric as PostgreSQL writes it: an optional minus,
/// digits with an optional fraction, or `NaN`, `Infinity`, `-Infinity`.
pub fn numeric_text(s: &str) -> bool {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return true;
    }
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    !int.is_empty()
        && int.bytes().all(|c| c.is_ascii_digit())
        && frac.bytes().all(|c| c.is_ascii_digit())
        && (!digits.contains('.') || !frac.is_empty())
}

#[cfg(test)]
mod tests {
    use super::super::strategies;
    use super::*;
    use proptest::prelude::*;

    fn read(ty: &PgType, json: &[u8]) -> Result<Value, serde_json::Error> {
        let mut d = serde_json::Deserializer::from_slice(json);
        let v = ValueSeed(ty).deserialize(&mut d)?;
        d.end()?;
        Ok(v)
    }

    proptest! {
        #![proptest_config(crate::types::strategies::config(4096))]

        /// Every value PostgreSQL admits for a type either fails the
        /// decision, or is written and read back to exactly itself (the
        /// array's shape normalised to one dimension from 1).
        #[test]
        fn every_value_that_travels_reads_back_exactly((ty, value) in strategies::typed_value()) {
            if super::super::check(&ty, &value).is_ok() {
                let mut out = Vec::new();
                write(&mut out, &ty, &value);
                let back = read(&ty, &out).map_err(|e| TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&out))))?;
                prop_assert_eq!(back, value, "{} as {}", ty, String::from_utf8_lossy(&out));
            }
        }
    }

    #[test]
    fn special_floats_and_extremes_have_exact_forms() {
        let text = |ty: PgType, v: Value| {
            let mut out = Vec::new();
            write(&mut out, &ty, &v);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(text(PgType::Float8, Value::Float8(f64::NAN)), "\"NaN\"");
        assert_eq!(text(PgType::Float8, Value::Float8(-0.0)), "-0.0");
        assert_eq!(text(PgType::Float4, Value::Float4(0.1)), "0.1", "the shortest f32 form, not 0.10000000149");
        assert_eq!(text(PgType::Float8, Value::Float8(f64::MIN_POSITIVE / 8.0)), "2.781342323134e-309");
        assert_eq!(text(PgType::Bytea, Value::Bytea(vec![0, 255, 1])), "\"AP8B\"");
        assert_eq!(text(PgType::Date, Value::Date(0)), "\"2000-01-01\"");
        assert_eq!(
            text(PgType::Timestamptz, Value::Timestamp(-time::PG_EPOCH_UNIX_US)),
            "\"1970-01-01T00:00:00.000000Z\""
        );
        assert_eq!(
            text(PgType::Array(Box::new(PgType::Int4)), Value::Array(Array::list(vec![Value::Int(1), Value::Null]))),
            "[1,null]"
        );
    }

    #[test]
    fn values_of_the_wrong_kind_are_refused() {
        assert!(read(&PgType::Int2, b"40000").is_err(), "out of smallint's range");
        assert!(read(&PgType::Int8, b"\"7\"").is_err());
        assert!(read(&PgType::Numeric(None), b"\"1e5\"").is_err(), "PostgreSQL never writes an exponent");
        assert!(read(&PgType::Numeric(None), b"\"1.\"").is_err());
        assert!(read(&PgType::Uuid, b"\"nope\"").is_err());
        assert!(read(&PgType::Date, b"\"2024-02-30\"").is_err());
        assert!(read(&PgType::Bytea, b"\"***\"").is_err());
        assert!(read(&PgType::Text, b"[1]").is_err());
        assert_eq!(read(&PgType::Float8, b"1").unwrap(), Value::Float8(1.0), "an integer is a float too");
        assert_eq!(read(&PgType::Text, b"null").unwrap(), Value::Null);
    }
}
