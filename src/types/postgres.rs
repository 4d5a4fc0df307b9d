//! Values from PostgreSQL: which catalogue types pg2ch knows, how each
//! column is selected, and how its binary wire form becomes a [`Value`].
//!
//! Binary forms are exact by construction (integers, floats' bits, a
//! timestamp's microseconds, `infinity` included). Text is read as the bytes
//! PostgreSQL stored (`convert_to(col::text, 'SQL_ASCII')`, which converts
//! nothing), because a `SQL_ASCII` database admits any byte but NUL and the
//! server would fail the whole claim converting invalid UTF-8 for the
//! client; such a value is then rejected per row. An array of text is read
//! the same way, as PostgreSQL's text form of the array, parsed here
//! ([`parse_text_array`]). Types whose exact form is PostgreSQL's own text
//! (`numeric`, `interval`, `inet`, ...) are selected as `col::text` (see
//! [`PgType::read_as_text`]); the sessions pg2ch opens set
//! `intervalstyle = iso_8601`, so an interval's text is ISO 8601.

use sqlx::Postgres;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo};

use super::{Array, KeyPart, PgType, Value};

/// The catalogue's facts about a column's type, domains resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogueType {
    /// Base type oid.
    pub oid: u32,
    /// `pg_type.typtype` of the base type (`e` for an enum).
    pub kind: String,
    /// Element base type oid and kind, for an array.
    pub element: Option<(u32, String)>,
    pub typmod: i32,
    /// `format_type()`, for messages.
    pub name: String,
}

/// The [`PgType`] of a scalar type oid, if pg2ch knows it.
fn scalar(oid: u32, kind: &str, typmod: i32) -> Option<PgType> {
    Some(match oid {
        16 => PgType::Bool,
        21 => PgType::Int2,
        23 => PgType::Int4,
        20 => PgType::Int8,
        700 => PgType::Float4,
        701 => PgType::Float8,
        1700 => PgType::Numeric(numeric_typmod(typmod)),
        25 | 1043 | 19 => PgType::Text,
        1042 => PgType::Bpchar,
        17 => PgType::Bytea,
        2950 => PgType::Uuid,
        1082 => PgType::Date,
        1114 => PgType::Timestamp,
        1184 => PgType::Timestamptz,
        1083 => PgType::Time,
        1186 => PgType::Interval,
        114 => PgType::Json,
        3802 => PgType::Jsonb,
        869 => PgType::Inet,
        650 => PgType::Cidr,
        _ if kind == "e" => PgType::Enum,
        _ => return None,
    })
}

/// `numeric(p,s)` from its typmod (PostgreSQL 15 admits a negative scale).
fn numeric_typmod(typmod: i32) -> Option<(i32, i32)> {
    (typmod >= 4).then(|| {
        let t = typmod - 4;
        ((t >> 16) & 0xffff, ((t & 0x7ff) ^ 1024) - 1024)
    })
}

impl CatalogueType {
    /// The type pg2ch carries this column as; `None` for a type it does not
    /// know, unless `other_as_text` (then its text form travels).
    pub fn pg_type(&self, other_as_text: bool) -> Option<PgType> {
        let other = |name: &str| other_as_text.then(|| PgType::Other(name.trim_end_matches("[]").to_owned()));
        match &self.element {
            Some((oid, kind)) => {
                let element = scalar(*oid, kind, self.typmod).or_else(|| other(&self.name))?;
                Some(PgType::Array(Box::new(element)))
            }
            None => scalar(self.oid, &self.kind, self.typmod).or_else(|| other(&self.name)),
        }
    }
}

/// The expression that selects a column (already quoted) in the form [`decode`] reads.
pub fn select_expr(column: &str, ty: &PgType) -> String {
    match ty {
        // concat() writes a char(n) with its padding (a cast to text drops it).
        PgType::Bpchar => format!("convert_to(concat({column}), 'SQL_ASCII')"),
        PgType::Array(e) if e.text_like() => format!("convert_to({column}::text, 'SQL_ASCII')"),
        PgType::Array(e) if e.read_as_text() => format!("{column}::text[]"),
        _ if ty.text_like() => format!("convert_to({column}::text, 'SQL_ASCII')"),
        _ if ty.read_as_text() => format!("{column}::text"),
        _ => column.to_owned(),
    }
}

/// Why a value in PostgreSQL's binary form could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("PostgreSQL sent {what} where pg2ch expected {expected}")]
pub struct WireError {
    what: String,
    expected: String,
}

fn wire_error(bytes: &[u8], ty: &PgType) -> WireError {
    WireError { what: format!("{} bytes", bytes.len()), expected: format!("a {ty}") }
}

fn be<const N: usize>(bytes: &[u8], ty: &PgType) -> Result<[u8; N], WireError> {
    bytes.try_into().map_err(|_| wire_error(bytes, ty))
}

/// A column's value from its binary wire form (`None`: NULL).
pub fn decode(ty: &PgType, bytes: Option<&[u8]>) -> Result<Value, WireError> {
    let Some(b) = bytes else { return Ok(Value::Null) };
    Ok(match ty {
        PgType::Bool => Value::Bool(be::<1>(b, ty)?[0] != 0),
        PgType::Int2 => Value::Int(i16::from_be_bytes(be(b, ty)?).into()),
        PgType::Int4 => Value::Int(i32::from_be_bytes(be(b, ty)?).into()),
        PgType::Int8 => Value::Int(i64::from_be_bytes(be(b, ty)?)),
        PgType::Float4 => Value::Float4(f32::from_be_bytes(be(b, ty)?)),
        PgType::Float8 => Value::Float8(f64::from_be_bytes(be(b, ty)?)),
        PgType::Numeric(_) => match Value::text(b.to_vec()) {
            Value::Text(s) => Value::Numeric(s),
            other => other,
        },
        PgType::Bytea => Value::Bytea(b.to_vec()),
        PgType::Uuid => Value::Uuid(be(b, ty)?),
        PgType::Date => Value::Date(i32::from_be_bytes(be(b, ty)?)),
        PgType::Timestamp | PgType::Timestamptz => Value::Timestamp(i64::from_be_bytes(be(b, ty)?)),
        PgType::Array(element) if element.text_like() => {
            Value::Array(parse_text_array(b).ok_or_else(|| WireError {
                what: format!("the array text {:?}", String::from_utf8_lossy(&b[..b.len().min(60)])),
                expected: format!("a {element}[]"),
            })?)
        }
        PgType::Array(element) => Value::Array(decode_array(element, b)?),
        // jsonb is selected as text; json's binary form is its text.
        _ => Value::text(b.to_vec()),
    })
}

/// PostgreSQL's binary array: dimensions, then each element with its length (-1: NULL).
fn decode_array(element: &PgType, b: &[u8]) -> Result<Array, WireError> {
    let bad =
        || WireError { what: format!("a malformed array of {} bytes", b.len()), expected: format!("a {element}[]") };
    let mut at = 0usize;
    let int = |at: &mut usize| -> Result<i32, WireError> {
        let v = b.get(*at..*at + 4).ok_or_else(bad)?;
        *at += 4;
        Ok(i32::from_be_bytes(v.try_into().expect("four bytes")))
    };
    let ndim = int(&mut at)?;
    let _has_nulls = int(&mut at)?;
    let _element_oid = int(&mut at)?;
    if !(0..=6).contains(&ndim) {
        return Err(bad());
    }
    let mut dims = Vec::with_capacity(ndim as usize);
    let mut count: usize = usize::from(ndim > 0);
    for _ in 0..ndim {
        let (len, lower) = (int(&mut at)?, int(&mut at)?);
        count = count.checked_mul(usize::try_from(len).map_err(|_| bad())?).ok_or_else(bad)?;
        dims.push((len, lower));
    }
    let mut elements = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let len = int(&mut at)?;
        if len < 0 {
            elements.push(Value::Null);
            continue;
        }
        let bytes = b.get(at..at + len as usize).ok_or_else(bad)?;
        at += len as usize;
        elements.push(decode(element, Some(bytes))?);
    }
    Ok(Array { dims, elements })
}

/// PostgreSQL's text form of an array of text-like values (as `array_out`
/// writes it): an optional `[lo:hi]...=` prefix when the lower bounds are
/// not 1, nested braces per dimension, elements separated by commas, quoted
/// with `"` (and `\` escaping inside) when they need it, `NULL` unquoted for
/// a NULL. Elements are kept as the bytes they are. `None` if it is not that.
pub fn parse_text_array(b: &[u8]) -> Option<Array> {
    let mut at = 0;
    let mut bounds: Vec<(i32, i32)> = Vec::new();
    // `[lo:hi][lo:hi]=`
    while b.get(at) == Some(&b'[') {
        let close = at + b[at..].iter().position(|c| *c == b']')?;
        let (lo, hi) = std::str::from_utf8(&b[at + 1..close]).ok()?.split_once(':')?;
        let (lo, hi): (i32, i32) = (lo.parse().ok()?, hi.parse().ok()?);
        bounds.push((hi.checked_sub(lo)?.checked_add(1)?, lo));
        at = close + 1;
    }
    if !bounds.is_empty() {
        if b.get(at) != Some(&b'=') {
            return None;
        }
        at += 1;
    }
    let mut elements = Vec::new();
    let mut depth = 0usize;
    let mut max_depth = 0usize;
    let mut lengths: Vec<i32> = Vec::new();
    let mut counts: Vec<i32> = Vec::new();
    let mut expect_element = true;
    while at < b.len() {
        match b[at] {
            b'{' => {
                depth += 1;
                max_depth = max_depth.max(depth);
                if counts.len() < depth {
                    counts.resize(depth, 0);
                }
                counts[depth - 1] = 0;
                at += 1;
                expect_element = true;
            }
            b'}' => {
                if depth == 0 {
                    return None;
                }
                if lengths.len() < depth {
                    lengths.resize(depth, 0);
                }
                lengths[depth - 1] = counts[depth - 1];
                depth -= 1;
                if depth > 0 {
                    counts[depth - 1] += 1;
                }
                at += 1;
                expect_element = false;
            }
            b',' => {
                at += 1;
                expect_element = true;
            }
            b'"' if expect_element => {
                let mut value = Vec::new();
                at += 1;
                loop {
                    match *b.get(at)? {
                        b'\\' => {
                            value.push(*b.get(at + 1)?);
                            at += 2;
                        }
                        b'"' => {
                            at += 1;
                            break;
                        }
                        c => {
                            value.push(c);
                            at += 1;
                        }
                    }
                }
                elements.push(Value::text(value));
                counts[depth.checked_sub(1)?] += 1;
                expect_element = false;
            }
            _ if expect_element && depth > 0 => {
                let end = at + b[at..].iter().position(|c| *c == b',' || *c == b'}')?;
                let raw = &b[at..end];
                elements.push(if raw == b"NULL" { Value::Null } else { Value::text(raw.to_vec()) });
                counts[depth - 1] += 1;
                at = end;
                expect_element = false;
            }
            _ => return None,
        }
    }
    if depth != 0 {
        return None;
    }
    let dims = if elements.is_empty() {
        Vec::new()
    } else if bounds.is_empty() {
        lengths.iter().take(max_depth).map(|len| (*len, 1)).collect()
    } else {
        bounds
    };
    Some(Array { dims, elements })
}

/// The type oid of a key column's parameter.
fn key_oid(ty: &PgType) -> u32 {
    match ty {
        PgType::Bool => 16,
        PgType::Int2 => 21,
        PgType::Int4 => 23,
        PgType::Int8 => 20,
        PgType::Bpchar => 1042,
        PgType::Bytea => 17,
        PgType::Uuid => 2950,
        PgType::Date => 1082,
        PgType::Timestamp => 1114,
        PgType::Timestamptz => 1184,
        _ => 25,
    }
}

/// A key part bound as a parameter of its column's own type, in binary, so
/// that PostgreSQL compares it exactly as it compares the column (and uses
/// pg2ch's index on unsent rows).
pub struct KeyParam<'a> {
    pub ty: &'a PgType,
    pub part: &'a KeyPart,
}

impl sqlx::Type<Postgres> for KeyParam<'_> {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(25))
    }
}

impl sqlx::Encode<'_, Postgres> for KeyParam<'_> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        match (self.ty, self.part) {
            (_, KeyPart::Bool(b)) => buf.push(u8::from(*b)),
            (PgType::Int2, KeyPart::Int(i)) => buf.extend_from_slice(&i16::try_from(*i)?.to_be_bytes()),
            (PgType::Int4, KeyPart::Int(i)) => buf.extend_from_slice(&i32::try_from(*i)?.to_be_bytes()),
            (_, KeyPart::Int(i)) => buf.extend_from_slice(&i.to_be_bytes()),
            (_, KeyPart::Text(b) | KeyPart::Bytea(b)) => buf.extend_from_slice(b),
            (_, KeyPart::Uuid(u)) => buf.extend_from_slice(u),
            (_, KeyPart::Date(d)) => buf.extend_from_slice(&d.to_be_bytes()),
            (_, KeyPart::Timestamp(t)) => buf.extend_from_slice(&t.to_be_bytes()),
        }
        Ok(sqlx::encode::IsNull::No)
    }

    fn produces(&self) -> Option<PgTypeInfo> {
        Some(PgTypeInfo::with_oid(Oid(key_oid(self.ty))))
    }
}

/// A `timestamptz` in PostgreSQL's binary form (microseconds since 2000,
/// `i64::MAX`/`MIN` for `±infinity`), to bind or read any time exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgTimestamp(pub i64);

impl sqlx::Type<Postgres> for PgTimestamp {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(1184))
    }
}

impl sqlx::postgres::PgHasArrayType for PgTimestamp {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(1185))
    }
}

impl sqlx::Encode<'_, Postgres> for PgTimestamp {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        buf.extend_from_slice(&self.0.to_be_bytes());
        Ok(sqlx::encode::IsNull::No)
    }
}

impl sqlx::Decode<'_, Postgres> for PgTimestamp {
    fn decode(value: sqlx::postgres::PgValueRef<'_>) -> Result<Self, sqlx::error::BoxDynError> {
        let bytes: [u8; 8] = <&[u8] as sqlx::Decode<Postgres>>::decode(value)?
            .try_into()
            .map_err(|_| "a timestamptz is 8 bytes in binary form")?;
        Ok(PgTimestamp(i64::from_be_bytes(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_types_map_and_others_need_the_opt_in() {
        let t = |oid, kind: &str, element: Option<(u32, &str)>, typmod| CatalogueType {
            oid,
            kind: kind.into(),
            element: element.map(|(o, k)| (o, k.into())),
            typmod,
            name: "point".into(),
        };
        assert_eq!(t(1700, "b", None, (12 << 16) + 2 + 4).pg_type(false), Some(PgType::Numeric(Some((12, 2)))));
        assert_eq!(t(1700, "b", None, (5 << 16) + 0x7fe + 4).pg_type(false), Some(PgType::Numeric(Some((5, -2)))));
        assert_eq!(t(1700, "b", None, -1).pg_type(false), Some(PgType::Numeric(None)));
        assert_eq!(t(12345, "e", None, -1).pg_type(false), Some(PgType::Enum));
        assert_eq!(t(600, "b", None, -1).pg_type(false), None);
        assert_eq!(t(600, "b", None, -1).pg_type(true), Some(PgType::Other("point".into())));
        assert_eq!(t(1007, "b", Some((23, "b")), -1).pg_type(false), Some(PgType::Array(Box::new(PgType::Int4))));
        assert_eq!(select_expr("\"n\"", &PgType::Numeric(None)), "\"n\"::text");
        assert_eq!(select_expr("\"a\"", &PgType::Array(Box::new(PgType::Inet))), "\"a\"::text[]");
        assert_eq!(select_expr("\"a\"", &PgType::Array(Box::new(PgType::Int4))), "\"a\"");
    }

    #[test]
    fn binary_arrays_keep_their_shape() {
        // '[0:1]={7,NULL}'::int4[] as PostgreSQL sends it.
        let mut b = Vec::new();
        for v in [1i32, 1, 23, 2, 0] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&4i32.to_be_bytes());
        b.extend_from_slice(&7i32.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        let v = decode(&PgType::Array(Box::new(PgType::Int4)), Some(&b)).unwrap();
        assert_eq!(v, Value::Array(Array { dims: vec![(2, 0)], elements: vec![Value::Int(7), Value::Null] }));
        assert!(decode(&PgType::Array(Box::new(PgType::Int4)), Some(&b[..10])).is_err(), "truncated");
        assert!(decode(&PgType::Int4, Some(&[1, 2])).is_err());
        assert_eq!(decode(&PgType::Text, Some(&[0xff])).unwrap(), Value::BadText(vec![0xff]));
    }

    #[test]
    fn text_arrays_read_as_postgres_writes_them() {
        let text = |s: &str| Value::Text(s.into());
        let one = |e: Vec<Value>| Some(Array::list(e));
        assert_eq!(parse_text_array(b"{}"), Some(Array::list(vec![])));
        assert_eq!(
            parse_text_array(br#"{a,"b c",NULL,"NULL",""}"#),
            one(vec![text("a"), text("b c"), Value::Null, text("NULL"), text("")])
        );
        assert_eq!(
            parse_text_array(br#"{"quote\" back\\slash","{x}"}"#),
            one(vec![text("quote\" back\\slash"), text("{x}")])
        );
        assert_eq!(
            parse_text_array(b"{{a,b},{c,d}}"),
            Some(Array { dims: vec![(2, 1), (2, 1)], elements: vec![text("a"), text("b"), text("c"), text("d")] })
        );
        assert_eq!(
            parse_text_array(b"[0:1]={x,y}"),
            Some(Array { dims: vec![(2, 0)], elements: vec![text("x"), text("y")] })
        );
        assert_eq!(parse_text_array(&[b'{', 0xff, b'}']).unwrap().elements, vec![Value::BadText(vec![0xff])]);
        for bad in [&b"{a"[..], b"a}", b"{\"a}", b"[1:x]={a}", b"[1:1]{a}"] {
            assert_eq!(parse_text_array(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
