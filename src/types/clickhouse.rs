//! Values in ClickHouse: the columns a PostgreSQL column becomes, by server
//! version, and their `RowBinary` form in both directions (pg2ch writes
//! inserts and reads `verify`'s rows in it).
//!
//! A PostgreSQL column becomes one physical column of the same name, except:
//! a `date` is `<c>_days Int32` and a `timestamp` is `<c>_us Int64` (exact
//! over PostgreSQL's whole range), each with a MATERIALIZED `<c>` of
//! ClickHouse's own date type for queries (exact only inside that type's
//! range); a nullable array adds `<c>_null UInt8`, since ClickHouse has no
//! nullable arrays. `RowBinary` is little-endian; strings and arrays are
//! prefixed by their length as an unsigned LEB128; a `Nullable` value by a
//! byte (1: NULL); a `UUID` is its two 8-byte halves, each reversed.

use super::time::{PG_EPOCH_UNIX_DAYS, PG_EPOCH_UNIX_US};
use super::{Array, PgType, Value};

/// What the server can do, detected at start from its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub version: (u32, u32),
    /// `DateTime64` and `fromUnixTimestamp64Micro` (20.5 and later).
    pub datetime64: bool,
    /// `RowBinaryWithNamesAndTypes`, which the crate's schema validation needs.
    pub validation: bool,
    /// The `async_insert` setting (21.11 and later), pinned off.
    pub async_insert: bool,
    /// The `Bool` type (22.1 and later; `UInt8` before).
    pub bool_type: bool,
    /// The `Date32` type (21.9 and later; `Date` before).
    pub date32: bool,
    /// `ReplacingMergeTree(version, is_deleted)` (23.2 and later).
    pub is_deleted: bool,
}

impl Capabilities {
    pub const fn from_parts(major: u32, minor: u32) -> Self {
        const fn at_least(version: (u32, u32), major: u32, minor: u32) -> bool {
            version.0 > major || (version.0 == major && version.1 >= minor)
        }
        let v = (major, minor);
        Capabilities {
            version: v,
            datetime64: at_least(v, 20, 5),
            validation: major >= 24,
            async_insert: at_least(v, 21, 11),
            bool_type: at_least(v, 22, 1),
            date32: at_least(v, 21, 9),
            is_deleted: at_least(v, 23, 2),
        }
    }

    pub fn from_version(text: &str) -> anyhow::Result<Self> {
        let mut parts = text.trim().split('.').map(|p| p.parse::<u32>());
        let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
            anyhow::bail!("cannot read ClickHouse version {text:?}");
        };
        Ok(Self::from_parts(major, minor))
    }
}

/// One ClickHouse column: its name, type, and for a MATERIALIZED one the expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChColumn {
    pub name: String,
    pub ty: String,
    pub materialized: Option<String>,
}

/// The unit suffix of the exact column of a temporal type.
fn unit_suffix(ty: &PgType) -> Option<&'static str> {
    match ty.element().unwrap_or(ty) {
        PgType::Date => Some("_days"),
        PgType::Timestamp | PgType::Timestamptz => Some("_us"),
        _ => None,
    }
}

/// The name of the physical column holding a PostgreSQL column's value.
pub fn value_column(name: &str, ty: &PgType) -> String {
    format!("{name}{}", unit_suffix(ty).unwrap_or(""))
}

/// The ClickHouse type of a scalar's physical column (not nullable).
fn scalar(ty: &PgType, caps: &Capabilities) -> String {
    match ty {
        PgType::Bool if caps.bool_type => "Bool".into(),
        PgType::Bool => "UInt8".into(),
        PgType::Int2 => "Int16".into(),
        PgType::Int4 => "Int32".into(),
        PgType::Int8 | PgType::Timestamp | PgType::Timestamptz => "Int64".into(),
        PgType::Float4 => "Float32".into(),
        PgType::Float8 => "Float64".into(),
        PgType::Numeric(_) => match ty.decimal() {
            Some((p, s)) => format!("Decimal({p}, {s})"),
            None => "String".into(),
        },
        PgType::Uuid => "UUID".into(),
        PgType::Date => "Int32".into(),
        _ => "String".into(),
    }
}

/// The convenience type and expression of a temporal value column, `x` being the exact value.
fn convenience(ty: &PgType, caps: &Capabilities, x: &str) -> (String, String) {
    match (ty, caps.datetime64, caps.date32) {
        (PgType::Date, _, true) => ("Date32".into(), format!("toDate32({x})")),
        (PgType::Date, _, false) => ("Date".into(), format!("toDate({x})")),
        (_, true, _) => ("DateTime64(6, 'UTC')".into(), format!("fromUnixTimestamp64Micro({x})")),
        (_, false, _) => ("DateTime".into(), format!("toDateTime(intDiv({x}, 1000000))")),
    }
}

/// The ClickHouse columns of a PostgreSQL column, physical ones first, in
/// the order [`write()`] writes them.
pub fn columns(name: &str, ty: &PgType, nullable: bool, caps: &Capabilities) -> Vec<ChColumn> {
    let quoted = crate::config::ch_ident(&value_column(name, ty));
    let mut out = Vec::new();
    match ty {
        PgType::Array(element) => {
            out.push(ChColumn {
                name: value_column(name, ty),
                ty: format!("Array(Nullable({}))", scalar(element, caps)),
                materialized: None,
            });
            if unit_suffix(ty).is_some() {
                let (conv, expr) = convenience(element, caps, "x");
                out.push(ChColumn {
                    name: name.to_owned(),
                    ty: format!("Array(Nullable({conv}))"),
                    materialized: Some(format!("arrayMap(x -> {expr}, {quoted})")),
                });
            }
            if nullable {
                out.push(ChColumn { name: format!("{name}_null"), ty: "UInt8".into(), materialized: None });
            }
        }
        _ => {
            let wrap = |t: String| if nullable { format!("Nullable({t})") } else { t };
            out.push(ChColumn { name: value_column(name, ty), ty: wrap(scalar(ty, caps)), materialized: None });
            if unit_suffix(ty).is_some() {
                let (conv, expr) = convenience(ty, caps, &quoted);
                out.push(ChColumn { name: name.to_owned(), ty: wrap(conv), materialized: Some(expr) });
            }
        }
    }
    out
}

/// Appends an unsigned LEB128, `RowBinary`'s length prefix.
fn varint(buf: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            buf.push(byte);
            return;
        }
        buf.push(byte | 0x80);
    }
}

fn bytes(buf: &mut Vec<u8>, b: &[u8]) {
    varint(buf, b.len() as u64);
    buf.extend_from_slice(b);
}

/// A UUID as ClickHouse sends it: each 8-byte half reversed.
fn uuid_wire(u: &[u8; 16]) -> [u8; 16] {
    let mut out = *u;
    out[..8].reverse();
    out[8..].reverse();
    out
}

/// A `numeric(p,s)`'s text in units of 10^-scale, if `Decimal` holds it
/// exactly: no more than `scale` fractional digits, at most 38 digits in all.
pub fn decimal_units(text: &str, scale: u32) -> Option<i128> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() || frac.len() > scale as usize || !(int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit())) {
        return None;
    }
    let int = int.trim_start_matches('0');
    if int.len() + scale as usize > 38 {
        return None;
    }
    let mut units: i128 = 0;
    for c in int.bytes().chain(frac.bytes()).chain(std::iter::repeat_n(b'0', scale as usize - frac.len())) {
        units = units.checked_mul(10)?.checked_add(i128::from(c - b'0'))?;
    }
    Some(if negative { -units } else { units })
}

/// Decimal units as PostgreSQL writes a `numeric(p,s)`: exactly `scale`
/// fractional digits, no sign on zero.
pub fn decimal_text(units: i128, scale: u32) -> String {
    let digits = units.unsigned_abs().to_string();
    let scale = scale as usize;
    let padded =
        if digits.len() <= scale { format!("{}{digits}", "0".repeat(scale + 1 - digits.len())) } else { digits };
    let (int, frac) = padded.split_at(padded.len() - scale);
    let sign = if units < 0 { "-" } else { "" };
    if scale == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") }
}

/// Writes a non-NULL scalar of `ty` (a NULL where none may be: the type's zero).
fn write_scalar(buf: &mut Vec<u8>, ty: &PgType, value: &Value) {
    match (ty, value) {
        (PgType::Bool, Value::Bool(b)) => buf.push(u8::from(*b)),
        (PgType::Int2, Value::Int(i)) => buf.extend_from_slice(&(*i as i16).to_le_bytes()),
        (PgType::Int4, Value::Int(i)) => buf.extend_from_slice(&(*i as i32).to_le_bytes()),
        (PgType::Int8, Value::Int(i)) => buf.extend_from_slice(&i.to_le_bytes()),
        (PgType::Float4, Value::Float4(x)) => buf.extend_from_slice(&x.to_le_bytes()),
        (PgType::Float8, Value::Float8(x)) => buf.extend_from_slice(&x.to_le_bytes()),
        (PgType::Numeric(_), Value::Numeric(text)) => match ty.decimal() {
            Some((p, s)) => write_decimal(buf, p, decimal_units(text, s).unwrap_or(0)),
            None => bytes(buf, text.as_bytes()),
        },
        (PgType::Uuid, Value::Uuid(u)) => buf.extend_from_slice(&uuid_wire(u)),
        (PgType::Date, Value::Date(d)) => {
            buf.extend_from_slice(&d.saturating_add(PG_EPOCH_UNIX_DAYS).to_le_bytes());
        }
        (PgType::Timestamp | PgType::Timestamptz, Value::Timestamp(us)) => {
            buf.extend_from_slice(&us.saturating_add(PG_EPOCH_UNIX_US).to_le_bytes());
        }
        (_, Value::Text(s)) => bytes(buf, s.as_bytes()),
        (_, Value::Bytea(b) | Value::BadText(b)) => bytes(buf, b),
        // NULL (a tombstone's non-key column) or a value of another kind:
        // the type's zero.
        (ty, _) => write_zero(buf, ty),
    }
}

fn write_decimal(buf: &mut Vec<u8>, precision: u32, units: i128) {
    match precision {
        0..=9 => buf.extend_from_slice(&(units as i32).to_le_bytes()),
        10..=18 => buf.extend_from_slice(&(units as i64).to_le_bytes()),
        _ => buf.extend_from_slice(&units.to_le_bytes()),
    }
}

fn write_zero(buf: &mut Vec<u8>, ty: &PgType) {
    match ty {
        PgType::Bool => buf.push(0),
        PgType::Int2 => buf.extend_from_slice(&[0; 2]),
        PgType::Int4 | PgType::Float4 | PgType::Date => buf.extend_from_slice(&[0; 4]),
        PgType::Int8 | PgType::Float8 | PgType::Timestamp | PgType::Timestamptz => buf.extend_from_slice(&[0; 8]),
        PgType::Numeric(_) => match ty.decimal() {
            Some((p, _)) => write_decimal(buf, p, 0),
            None => varint(buf, 0),
        },
        PgType::Uuid => buf.extend_from_slice(&[0; 16]),
        PgType::Array(_) => varint(buf, 0),
        _ => varint(buf, 0),
    }
}

/// Writes a PostgreSQL column's value into its physical columns, in the
/// order [`columns`] lists them.
pub fn write(buf: &mut Vec<u8>, ty: &PgType, nullable: bool, value: &Value) {
    match ty {
        PgType::Array(element) => {
            let empty = Array::list(Vec::new());
            let array = match value {
                Value::Array(a) => a,
                _ => &empty,
            };
            varint(buf, array.elements.len() as u64);
            for e in &array.elements {
                if e.is_null() {
                    buf.push(1);
                } else {
                    buf.push(0);
                    write_scalar(buf, element, e);
                }
            }
            if nullable {
                buf.push(u8::from(value.is_null()));
            }
        }
        _ if nullable => {
            if value.is_null() {
                buf.push(1);
            } else {
                buf.push(0);
                write_scalar(buf, ty, value);
            }
        }
        _ => write_scalar(buf, ty, value),
    }
}

/// Why `RowBinary` from ClickHouse could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    #[error("RowBinary ended in the middle of a value")]
    Truncated,
    #[error("RowBinary holds {0}, which pg2ch never writes")]
    Unexpected(&'static str),
}

/// Whether [`Reader::value`] reads `ty` as text (the last arm of its
/// scalars): a `String` column and nothing else.
fn read_as_text(ty: &PgType) -> bool {
    !matches!(
        ty,
        PgType::Bool
            | PgType::Int2
            | PgType::Int4
            | PgType::Int8
            | PgType::Float4
            | PgType::Float8
            | PgType::Numeric(_)
            | PgType::Uuid
            | PgType::Date
            | PgType::Timestamp
            | PgType::Timestamptz
            | PgType::Bytea
            | PgType::Array(_)
    )
}

/// A cursor over `RowBinary` bytes.
pub struct Reader<'a> {
    pub input: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Reader { input }
    }

    pub fn is_empty(&self) -> bool {
        self.input.is_empty()
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ReadError> {
        if self.input.len() < n {
            return Err(ReadError::Truncated);
        }
        let (head, rest) = self.input.split_at(n);
        self.input = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    pub fn u8(&mut self) -> Result<u8, ReadError> {
        Ok(self.take(1)?[0])
    }

    pub fn u64(&mut self) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub fn i64(&mut self) -> Result<i64, ReadError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn varint(&mut self) -> Result<u64, ReadError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(ReadError::Unexpected("a length longer than 64 bits"))
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], ReadError> {
        let n = self.varint()?;
        self.take(usize::try_from(n).map_err(|_| ReadError::Truncated)?)
    }

    fn scalar(&mut self, ty: &PgType) -> Result<Value, ReadError> {
        Ok(match ty {
            PgType::Bool => Value::Bool(self.u8()? != 0),
            PgType::Int2 => Value::Int(i16::from_le_bytes(self.array()?).into()),
            PgType::Int4 => Value::Int(i32::from_le_bytes(self.array()?).into()),
            PgType::Int8 => Value::Int(self.i64()?),
            PgType::Float4 => Value::Float4(f32::from_le_bytes(self.array()?)),
            PgType::Float8 => Value::Float8(f64::from_le_bytes(self.array()?)),
            PgType::Numeric(_) => match ty.decimal() {
                Some((p, s)) => {
                    let units = match p {
                        0..=9 => i128::from(i32::from_le_bytes(self.array()?)),
                        10..=18 => i128::from(i64::from_le_bytes(self.array()?)),
                        _ => i128::from_le_bytes(self.array()?),
                    };
                    Value::Numeric(decimal_text(units, s))
                }
                None => match Value::text(self.bytes()?.to_vec()) {
                    Value::Text(s) => Value::Numeric(s),
                    bad => bad,
                },
            },
            PgType::Uuid => Value::Uuid(uuid_wire(&self.array()?)),
            PgType::Date => {
                let unix = i32::from_le_bytes(self.array()?);
                Value::Date(
                    unix.checked_sub(PG_EPOCH_UNIX_DAYS).ok_or(ReadError::Unexpected("a day before -infinity"))?,
                )
            }
            PgType::Timestamp | PgType::Timestamptz => {
                let unix = self.i64()?;
                Value::Timestamp(
                    unix.checked_sub(PG_EPOCH_UNIX_US).ok_or(ReadError::Unexpected("a time before -infinity"))?,
                )
            }
            PgType::Bytea => Value::Bytea(self.bytes()?.to_vec()),
            PgType::Array(_) => return Err(ReadError::Unexpected("an array inside an array")),
            _ => Value::text(self.bytes()?.to_vec()),
        })
    }

    /// Reads a PostgreSQL column's value and returns its checksum hash,
    /// [`super::checksum::hash`] of what [`Reader::value`] would return.
    /// Text is hashed straight from its bytes, valid UTF-8 or not, as its
    /// value would be: `verify` hashes every row ClickHouse holds, and a
    /// text value's allocation and UTF-8 check cost more than its hash.
    /// Other values are built (without allocating, but for arrays, numerics
    /// and bytea).
    pub fn hash_value(&mut self, ty: &PgType, nullable: bool, seed: u64) -> Result<Option<u64>, ReadError> {
        if !read_as_text(ty) {
            return Ok(super::checksum::hash(ty, &self.value(ty, nullable)?, seed));
        }
        if nullable && self.u8()? == 1 {
            return Ok(None);
        }
        Ok(Some(super::checksum::hash_bytes(self.bytes()?, seed)))
    }

    /// Reads a PostgreSQL column's value from its physical columns.
    pub fn value(&mut self, ty: &PgType, nullable: bool) -> Result<Value, ReadError> {
        match ty {
            PgType::Array(element) => {
                let n = self.varint()?;
                let mut elements = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    elements.push(if self.u8()? == 1 { Value::Null } else { self.scalar(element)? });
                }
                let null = nullable && self.u8()? == 1;
                Ok(if null { Value::Null } else { Value::Array(Array::list(elements)) })
            }
            _ if nullable && self.u8()? == 1 => Ok(Value::Null),
            _ => self.scalar(ty),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::strategies;
    use super::*;
    use proptest::prelude::*;

    const OLD: Capabilities = Capabilities::from_parts(18, 16);

    proptest! {
        #![proptest_config(crate::types::strategies::config(4096))]

        /// Hashing a value as it is read gives the hash of the value read.
        #[test]
        fn a_value_hashed_as_read_hashes_as_the_value(
            (ty, value) in strategies::typed_value(),
            nullable in any::<bool>(),
            seed in any::<u64>(),
        ) {
            prop_assume!(super::super::check(&ty, &value).is_ok() && (nullable || !value.is_null()));
            let mut buf = Vec::new();
            write(&mut buf, &ty, nullable, &value);
            let mut r = Reader::new(&buf);
            prop_assert_eq!(r.hash_value(&ty, nullable, seed).unwrap(), super::super::checksum::hash(&ty, &value, seed));
            prop_assert!(r.is_empty(), "{} bytes left over", r.input.len());
        }

        /// Every value that travels is written and read back exactly.
        #[test]
        fn every_value_that_travels_round_trips_through_row_binary(
            (ty, value) in strategies::typed_value(),
            nullable in any::<bool>(),
        ) {
            prop_assume!(super::super::check(&ty, &value).is_ok() && (nullable || !value.is_null()));
            let mut buf = Vec::new();
            write(&mut buf, &ty, nullable, &value);
            let mut r = Reader::new(&buf);
            prop_assert_eq!(r.value(&ty, nullable).unwrap(), value);
            prop_assert!(r.is_empty(), "{} bytes left over", r.input.len());
        }

        #[test]
        fn decimal_text_reads_back(units in any::<i64>(), scale in 0u32..20) {
            let text = decimal_text(units.into(), scale);
            prop_assert_eq!(decimal_units(&text, scale), Some(units.into()), "{}", text);
        }
    }

    #[test]
    fn columns_keep_names_and_add_exact_companions() {
        let new = Capabilities::from_parts(26, 9);
        let names = |cols: Vec<ChColumn>| cols.into_iter().map(|c| (c.name, c.ty)).collect::<Vec<_>>();
        assert_eq!(
            names(columns("event_time", &PgType::Timestamptz, false, &OLD)),
            [("event_time_us".into(), "Int64".into()), ("event_time".into(), "DateTime".into())]
        );
        assert_eq!(
            names(columns("born", &PgType::Date, true, &new)),
            [("born_days".into(), "Nullable(Int32)".into()), ("born".into(), "Nullable(Date32)".into())]
        );
        assert_eq!(
            names(columns("tags", &PgType::Array(Box::new(PgType::Text)), true, &new)),
            [("tags".into(), "Array(Nullable(String))".into()), ("tags_null".into(), "UInt8".into())]
        );
        assert_eq!(columns("n", &PgType::Numeric(Some((10, 2))), false, &OLD)[0].ty, "Decimal(10, 2)");
        assert_eq!(columns("n", &PgType::Numeric(Some((40, 2))), false, &OLD)[0].ty, "String");
        assert_eq!(columns("n", &PgType::Numeric(Some((5, -2))), false, &OLD)[0].ty, "String");
        assert_eq!(columns("b", &PgType::Bool, false, &new)[0].ty, "Bool");
    }

    #[test]
    fn uuid_and_decimal_have_clickhouses_wire_forms() {
        // As ClickHouse 18.16 answered `SELECT toUUID('61f0c404-...') FORMAT RowBinary`.
        let u = super::super::parse_uuid("61f0c404-5cb3-11e7-907b-a6006ad3dba0").unwrap();
        let mut buf = Vec::new();
        write(&mut buf, &PgType::Uuid, false, &Value::Uuid(u));
        assert_eq!(super::super::hex(&buf), "e711b35c04c4f061a0dbd36a00a67b90");
        assert_eq!(decimal_units("-1.5", 3), Some(-1500));
        assert_eq!(decimal_units("1.2345", 3), None, "more digits than the scale");
        assert_eq!(decimal_units("NaN", 3), None);
        assert_eq!(decimal_text(0, 2), "0.00");
        assert_eq!(decimal_text(-5, 2), "-0.05");
        assert_eq!(Reader::new(&[0x80]).bytes(), Err(ReadError::Truncated));
    }
}
