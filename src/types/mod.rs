//! The type mapping, in one place: for every PostgreSQL type pg2ch carries,
//! how its values are read from PostgreSQL ([`postgres`]), whether a value
//! can travel ([`check`]), its form in the message ([`json`]), its
//! ClickHouse column and binary form ([`clickhouse`]), and its checksum on
//! both sides ([`checksum`]). Adding a type means adding a [`PgType`]
//! variant and an arm in each of those.
//!
//! The table of each type's form in the message and in ClickHouse, and of
//! what cannot travel, is in `docs/types.md`, and only there: a test here
//! checks that every [`PgType`] has its row in it and that the ClickHouse
//! types that row names are the ones [`clickhouse::columns`] makes.
//!
//! A nullable column is `Nullable(T)` in ClickHouse (arrays: see above).
//! What cannot travel is rejected per row, with the column and the reason:
//! invalid UTF-8 in text (a `SQL_ASCII` database admits it), `±infinity`
//! and times after 294247 AD in timestamps, `±infinity` in dates, `NaN` in a
//! `numeric(p,s)` that maps to `Decimal`, arrays of more than one dimension
//! or not starting at index 1.

pub mod checksum;
pub mod clickhouse;
pub mod json;
pub mod postgres;
pub mod time;

use std::fmt;

/// A PostgreSQL column type pg2ch carries (domains resolved to their base type).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// `numeric(precision, scale)`, or `numeric` without a typmod.
    Numeric(Option<(i32, i32)>),
    /// `text`, `varchar(n)`, `name`.
    Text,
    /// `char(n)`: compared without trailing spaces, carried padded.
    Bpchar,
    Bytea,
    Uuid,
    Date,
    Timestamp,
    Timestamptz,
    Time,
    Interval,
    Json,
    Jsonb,
    Inet,
    Cidr,
    Enum,
    /// Another type carried as its text form (only with `--other-types text`).
    Other(String),
    /// A one-dimensional array of the element type (never itself an array).
    Array(Box<PgType>),
}

impl PgType {
    /// Whether a primary key may hold this type: pg2ch orders keys in
    /// memory exactly as PostgreSQL does (text in the `C` collation).
    pub fn can_be_key(&self) -> bool {
        matches!(
            self,
            PgType::Bool
                | PgType::Int2
                | PgType::Int4
                | PgType::Int8
                | PgType::Text
                | PgType::Bpchar
                | PgType::Bytea
                | PgType::Uuid
                | PgType::Date
                | PgType::Timestamp
                | PgType::Timestamptz
        )
    }

    /// Whether this type's values are text that may hold any bytes (in a
    /// `SQL_ASCII` database), read as those bytes.
    pub fn text_like(&self) -> bool {
        matches!(self, PgType::Text | PgType::Bpchar | PgType::Json | PgType::Jsonb | PgType::Enum | PgType::Other(_))
    }

    /// Whether this type's values are carried as text ([`Value::Text`]):
    /// everything without a form of its own in the message and in ClickHouse.
    pub fn carried_as_text(&self) -> bool {
        matches!(
            self,
            PgType::Text
                | PgType::Bpchar
                | PgType::Time
                | PgType::Interval
                | PgType::Json
                | PgType::Jsonb
                | PgType::Inet
                | PgType::Cidr
                | PgType::Enum
                | PgType::Other(_)
        )
    }

    /// Whether PostgreSQL hands this type over as its text form (`col::text`),
    /// which is then carried as it is.
    pub fn read_as_text(&self) -> bool {
        matches!(
            self,
            PgType::Numeric(_)
                | PgType::Time
                | PgType::Interval
                | PgType::Jsonb
                | PgType::Inet
                | PgType::Cidr
                | PgType::Enum
                | PgType::Other(_)
        )
    }

    /// `numeric(p,s)` that ClickHouse's `Decimal(p,s)` holds exactly.
    pub fn decimal(&self) -> Option<(u32, u32)> {
        match self {
            PgType::Numeric(Some((p, s))) if (1..=38).contains(p) && (0..=*p).contains(s) => {
                Some((*p as u32, *s as u32))
            }
            _ => None,
        }
    }

    pub fn element(&self) -> Option<&PgType> {
        match self {
            PgType::Array(e) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for PgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PgType::Bool => f.write_str("boolean"),
            PgType::Int2 => f.write_str("smallint"),
            PgType::Int4 => f.write_str("integer"),
            PgType::Int8 => f.write_str("bigint"),
            PgType::Float4 => f.write_str("real"),
            PgType::Float8 => f.write_str("double precision"),
            PgType::Numeric(None) => f.write_str("numeric"),
            PgType::Numeric(Some((p, s))) => write!(f, "numeric({p},{s})"),
            PgType::Text => f.write_str("text"),
            PgType::Bpchar => f.write_str("character"),
            PgType::Bytea => f.write_str("bytea"),
            PgType::Uuid => f.write_str("uuid"),
            PgType::Date => f.write_str("date"),
            PgType::Timestamp => f.write_str("timestamp"),
            PgType::Timestamptz => f.write_str("timestamptz"),
            PgType::Time => f.write_str("time"),
            PgType::Interval => f.write_str("interval"),
            PgType::Json => f.write_str("json"),
            PgType::Jsonb => f.write_str("jsonb"),
            PgType::Inet => f.write_str("inet"),
            PgType::Cidr => f.write_str("cidr"),
            PgType::Enum => f.write_str("enum"),
            PgType::Other(name) => f.write_str(name),
            PgType::Array(e) => write!(f, "{e}[]"),
        }
    }
}

/// A value as PostgreSQL holds it, in PostgreSQL's own terms (its epochs,
/// its infinities, text as the bytes it stored). Whether it can travel is
/// decided by [`check`]; everything downstream carries it exactly.
#[derive(Debug, Clone)]
pub enum Value {
    Null,
    Bool(bool),
    /// `smallint`, `integer`, `bigint`.
    Int(i64),
    Float4(f32),
    Float8(f64),
    /// The exact decimal text PostgreSQL writes (`-12.340`, `NaN`, `Infinity`).
    Numeric(String),
    /// Text-like values (see the table above), valid UTF-8.
    Text(String),
    /// Text that is not valid UTF-8 (a `SQL_ASCII` database admits it): never travels.
    BadText(Vec<u8>),
    Bytea(Vec<u8>),
    Uuid([u8; 16]),
    /// Days since 2000-01-01; `i32::MAX`/`i32::MIN` are `±infinity`.
    Date(i32),
    /// Microseconds since 2000-01-01 UTC; `i64::MAX`/`i64::MIN` are `±infinity`.
    Timestamp(i64),
    Array(Array),
}

/// An array as PostgreSQL holds it: its dimensions (length, lower bound)
/// and its elements in storage order. Only one dimension starting at 1 travels.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub dims: Vec<(i32, i32)>,
    pub elements: Vec<Value>,
}

impl Array {
    /// A one-dimensional array starting at 1 (or empty).
    pub fn list(elements: Vec<Value>) -> Self {
        let dims = if elements.is_empty() { Vec::new() } else { vec![(elements.len() as i32, 1)] };
        Array { dims, elements }
    }
}

/// Floats compare by their bits, except that every NaN equals every NaN
/// (PostgreSQL's view; the message carries one `"NaN"`).
impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        use Value::*;
        match (self, other) {
            (Null, Null) => true,
            (Bool(a), Bool(b)) => a == b,
            (Int(a), Int(b)) => a == b,
            (Float4(a), Float4(b)) => (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits(),
            (Float8(a), Float8(b)) => (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits(),
            (Numeric(a), Numeric(b)) | (Text(a), Text(b)) => a == b,
            (BadText(a), BadText(b)) | (Bytea(a), Bytea(b)) => a == b,
            (Uuid(a), Uuid(b)) => a == b,
            (Date(a), Date(b)) => a == b,
            (Timestamp(a), Timestamp(b)) => a == b,
            (Array(a), Array(b)) => a == b,
            _ => false,
        }
    }
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The text of a text-like value, valid or not.
    pub fn text_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Text(s) | Value::Numeric(s) => Some(s.as_bytes()),
            Value::BadText(b) => Some(b),
            _ => None,
        }
    }

    /// Text from PostgreSQL's bytes: valid UTF-8 becomes [`Value::Text`].
    pub fn text(bytes: Vec<u8>) -> Value {
        match String::from_utf8(bytes) {
            Ok(s) => Value::Text(s),
            Err(e) => Value::BadText(e.into_bytes()),
        }
    }
}

/// Whether `value`, held in a column of type `ty`, can travel exactly; the
/// reason if not, worded to follow the column's name ("is infinity, ...").
/// The one decision the real and the simulated source both go through.
pub fn check(ty: &PgType, value: &Value) -> Result<(), String> {
    match (ty, value) {
        (_, Value::Null) => Ok(()),
        (_, Value::BadText(bytes)) => {
            let valid = std::str::from_utf8(bytes).map_or_else(|e| e.valid_up_to(), |_| bytes.len());
            Err(format!("is not valid UTF-8 (byte {valid} of {})", bytes.len()))
        }
        (PgType::Timestamp | PgType::Timestamptz, Value::Timestamp(us)) => {
            time::unix_micros(*us).map(|_| ()).map_err(Into::into)
        }
        (PgType::Date, Value::Date(days)) => time::unix_days(*days).map(|_| ()).map_err(Into::into),
        (PgType::Numeric(_), Value::Numeric(text)) if ty.decimal().is_some() => {
            if clickhouse::decimal_units(text, ty.decimal().map_or(0, |(_, s)| s)).is_some() {
                Ok(())
            } else {
                Err(format!("is {text}, which {} in ClickHouse (Decimal) cannot hold", ty))
            }
        }
        (PgType::Array(element), Value::Array(array)) => {
            if array.dims.len() > 1 {
                return Err(format!("is a {}-dimensional array; only one-dimensional arrays travel", array.dims.len()));
            }
            if let Some((_, lower)) = array.dims.first().filter(|(_, lower)| *lower != 1) {
                return Err(format!("is an array starting at index {lower}; only arrays starting at 1 travel"));
            }
            for (i, e) in array.elements.iter().enumerate() {
                check(element, e).map_err(|why| format!("has element {} that {why}", i + 1))?;
            }
            Ok(())
        }
        _ if value_fits(ty, value) => Ok(()),
        _ => Err(format!("holds a {} value where {ty} was expected", value_kind(value))),
    }
}

/// Whether the value's variant is the one the type's values take.
fn value_fits(ty: &PgType, value: &Value) -> bool {
    match ty {
        PgType::Bool => matches!(value, Value::Bool(_)),
        PgType::Int2 => matches!(value, Value::Int(i) if i16::try_from(*i).is_ok()),
        PgType::Int4 => matches!(value, Value::Int(i) if i32::try_from(*i).is_ok()),
        PgType::Int8 => matches!(value, Value::Int(_)),
        PgType::Float4 => matches!(value, Value::Float4(_)),
        PgType::Float8 => matches!(value, Value::Float8(_)),
        PgType::Numeric(_) => matches!(value, Value::Numeric(_)),
        PgType::Bytea => matches!(value, Value::Bytea(_)),
        PgType::Uuid => matches!(value, Value::Uuid(_)),
        PgType::Date => matches!(value, Value::Date(_)),
        PgType::Timestamp | PgType::Timestamptz => matches!(value, Value::Timestamp(_)),
        PgType::Array(_) => matches!(value, Value::Array(_)),
        _ => ty.carried_as_text() && matches!(value, Value::Text(_)),
    }
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "NULL",
        Value::Bool(_) => "boolean",
        Value::Int(_) => "integer",
        Value::Float4(_) | Value::Float8(_) => "floating point",
        Value::Numeric(_) => "numeric",
        Value::Text(_) | Value::BadText(_) => "text",
        Value::Bytea(_) => "bytea",
        Value::Uuid(_) => "uuid",
        Value::Date(_) => "date",
        Value::Timestamp(_) => "timestamp",
        Value::Array(_) => "array",
    }
}

/// One column of a primary key, ordered as PostgreSQL orders it in pg2ch's
/// index on unsent rows (text in the `C` collation: by bytes).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyPart {
    Bool(bool),
    Int(i64),
    /// Text's bytes (for `char(n)`, without trailing spaces, as PostgreSQL compares it).
    Text(Vec<u8>),
    Bytea(Vec<u8>),
    Uuid([u8; 16]),
    /// PostgreSQL's days.
    Date(i32),
    /// PostgreSQL's microseconds.
    Timestamp(i64),
}

/// A primary key: its columns' parts in key order, compared column by column.
pub type Key = Vec<KeyPart>;

impl KeyPart {
    /// The key part of a value of a key type; `None` for a NULL or a type
    /// that cannot be a key (which `init` refuses).
    pub fn of(ty: &PgType, value: &Value) -> Option<KeyPart> {
        Some(match value {
            Value::Bool(b) => KeyPart::Bool(*b),
            Value::Int(i) => KeyPart::Int(*i),
            Value::Text(_) | Value::BadText(_) => {
                let bytes = value.text_bytes()?;
                let bytes = if *ty == PgType::Bpchar {
                    let end = bytes.iter().rposition(|b| *b != b' ').map_or(0, |i| i + 1);
                    &bytes[..end]
                } else {
                    bytes
                };
                KeyPart::Text(bytes.to_vec())
            }
            Value::Bytea(b) => KeyPart::Bytea(b.clone()),
            Value::Uuid(u) => KeyPart::Uuid(*u),
            Value::Date(d) => KeyPart::Date(*d),
            Value::Timestamp(t) => KeyPart::Timestamp(*t),
            _ => return None,
        })
    }
}

impl fmt::Display for KeyPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyPart::Bool(b) => write!(f, "{b}"),
            KeyPart::Int(i) => write!(f, "{i}"),
            KeyPart::Text(t) => write!(f, "{:?}", String::from_utf8_lossy(t)),
            KeyPart::Bytea(b) => write!(f, "\\x{}", hex(b)),
            KeyPart::Uuid(u) => f.write_str(&uuid_text(u)),
            KeyPart::Date(d) => match time::unix_days(*d) {
                Ok(days) => {
                    let mut out = Vec::new();
                    time::write_date(&mut out, days);
                    f.write_str(&String::from_utf8_lossy(&out))
                }
                Err(_) => f.write_str(if *d > 0 { "infinity" } else { "-infinity" }),
            },
            KeyPart::Timestamp(t) => match time::unix_micros(*t) {
                Ok(us) => {
                    let mut out = Vec::new();
                    time::write_time(&mut out, us);
                    f.write_str(&String::from_utf8_lossy(&out))
                }
                Err(_) => write!(f, "timestamp {t}"),
            },
        }
    }
}

/// A key as people read it: `42`, `("a", 7)`.
pub fn key_text(key: &[KeyPart]) -> String {
    match key {
        [one] => one.to_string(),
        parts => format!("({})", parts.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        push_hex(&mut s, *b);
    }
    s
}

/// A byte as two lower-case hex digits (without `format!`: every UUID of
/// every message goes through here).
fn push_hex(s: &mut String, b: u8) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    s.push(char::from(DIGITS[usize::from(b >> 4)]));
    s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
}

/// A UUID's canonical text: lower-case hex, 8-4-4-4-12.
pub fn uuid_text(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        push_hex(&mut s, *b);
    }
    s
}

/// Reads a UUID in its canonical text (upper case too), `None` otherwise.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|i| b[*i] != b'-') {
        return None;
    }
    let digits: Vec<u8> = b.iter().copied().filter(|c| *c != b'-').collect();
    if digits.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod strategies;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decision_names_what_cannot_travel() {
        let reason = |ty: PgType, v: Value| check(&ty, &v).unwrap_err();
        assert_eq!(reason(PgType::Text, Value::BadText(vec![b'a', 0xff])), "is not valid UTF-8 (byte 1 of 2)");
        assert!(reason(PgType::Timestamptz, Value::Timestamp(i64::MAX)).starts_with("is infinity"));
        assert!(reason(PgType::Date, Value::Date(i32::MIN)).starts_with("is -infinity"));
        assert!(reason(PgType::Numeric(Some((5, 2))), Value::Numeric("NaN".into())).contains("Decimal"));
        assert!(check(&PgType::Numeric(None), &Value::Numeric("NaN".into())).is_ok(), "unbounded numeric is text");
        let grid = Value::Array(Array { dims: vec![(2, 1), (2, 1)], elements: vec![Value::Int(1); 4] });
        assert!(reason(PgType::Array(Box::new(PgType::Int4)), grid).contains("2-dimensional"));
        let shifted = Value::Array(Array { dims: vec![(1, 0)], elements: vec![Value::Int(1)] });
        assert!(reason(PgType::Array(Box::new(PgType::Int4)), shifted).contains("index 0"));
        let bad_element = Value::Array(Array::list(vec![Value::Null, Value::Timestamp(i64::MIN)]));
        assert_eq!(
            reason(PgType::Array(Box::new(PgType::Timestamp)), bad_element),
            "has element 2 that is -infinity, which ClickHouse cannot hold"
        );
        assert!(reason(PgType::Int2, Value::Int(70_000)).contains("smallint"));
    }

    #[test]
    fn keys_order_as_postgres_orders_them() {
        let text = |s: &str| KeyPart::of(&PgType::Text, &Value::Text(s.into())).unwrap();
        assert!(text("B") < text("a"), "C collation: by bytes");
        assert!(text("a") < text("ab"));
        let padded = KeyPart::of(&PgType::Bpchar, &Value::Text("ab  ".into())).unwrap();
        assert_eq!(padded, text("ab"), "char(n) compares without trailing spaces");
        assert!(vec![KeyPart::Int(1), text("z")] < vec![KeyPart::Int(2), text("a")]);
        assert!(KeyPart::Timestamp(i64::MIN) < KeyPart::Timestamp(0), "-infinity first, as in PostgreSQL");
    }

    #[test]
    fn uuids_have_one_text() {
        let u = parse_uuid("61F0C404-5CB3-11e7-907b-a6006ad3dba0").unwrap();
        assert_eq!(uuid_text(&u), "61f0c404-5cb3-11e7-907b-a6006ad3dba0");
        assert!(parse_uuid("61f0c404-5cb3-11e7-907b-a6006ad3dba").is_none());
        assert!(parse_uuid("61f0c404x5cb3-11e7-907b-a6006ad3dba0").is_none());
        assert!(parse_uuid("g1f0c404-5cb3-11e7-907b-a6006ad3dba0").is_none());
        assert!(parse_uuid("61f0c404-5cb3-11e7-907b-a6006ad3db-0").is_none(), "a dash too many");
    }

    proptest::proptest! {
        /// The hand-written hex is what `format!` writes, and reads back.
        #[test]
        fn uuid_and_hex_text_are_formats_and_read_back(u in proptest::prelude::any::<[u8; 16]>()) {
            let reference: String = u.iter().map(|b| format!("{b:02x}")).collect();
            proptest::prop_assert_eq!(hex(&u), reference.clone());
            let dashed = format!("{}-{}-{}-{}-{}", &reference[0..8], &reference[8..12], &reference[12..16], &reference[16..20], &reference[20..32]);
            proptest::prop_assert_eq!(uuid_text(&u), dashed);
            proptest::prop_assert_eq!(parse_uuid(&uuid_text(&u)), Some(u));
        }
    }
}

/// `docs/types.md` checked against the code, so the table cannot drift.
#[cfg(test)]
mod docs_table {
    use super::PgType;
    use crate::clickhouse::Capabilities;

    /// The first cell of the row of `docs/types.md` that describes `ty`. An
    /// exhaustive match: a new variant does not compile until it has a row.
    fn row_of(ty: &PgType) -> &'static str {
        match ty {
            PgType::Bool => "`boolean`",
            PgType::Int2 | PgType::Int4 | PgType::Int8 => "`smallint`, `integer`, `bigint`",
            PgType::Float4 | PgType::Float8 => "`real`, `double precision`",
            PgType::Numeric(_) if ty.decimal().is_some() => "`numeric(p,s)`, p ≤ 38, 0 ≤ s ≤ p",
            PgType::Numeric(_) => "`numeric`, any other `numeric(p,s)`",
            PgType::Text | PgType::Bpchar => "`text`, `varchar(n)`, `char(n)`, `name`",
            PgType::Bytea => "`bytea`",
            PgType::Uuid => "`uuid`",
            PgType::Date => "`date`",
            PgType::Timestamp | PgType::Timestamptz => "`timestamp`, `timestamptz`",
            PgType::Time => "`time`",
            PgType::Interval => "`interval`",
            PgType::Json | PgType::Jsonb => "`json`, `jsonb`",
            PgType::Inet | PgType::Cidr => "`inet`, `cidr`",
            PgType::Enum => "enum types",
            PgType::Other(_) => "anything else, with `--other-types text`",
            PgType::Array(_) => "one-dimensional arrays of the above",
        }
    }

    /// One of each variant (both sides of the `Decimal` line for `numeric`).
    fn samples() -> Vec<PgType> {
        use PgType::*;
        let scalars = vec![
            Bool,
            Int2,
            Int4,
            Int8,
            Float4,
            Float8,
            Numeric(Some((12, 2))),
            Numeric(Some((60, 2))),
            Numeric(None),
            Text,
            Bpchar,
            Bytea,
            Uuid,
            Date,
            Timestamp,
            Timestamptz,
            Time,
            Interval,
            Json,
            Jsonb,
            Inet,
            Cidr,
            Enum,
            Other("point".into()),
        ];
        let arrays: Vec<PgType> = scalars.iter().map(|t| Array(Box::new(t.clone()))).collect();
        scalars.into_iter().chain(arrays).collect()
    }

    /// The table's rows: first cell to last cell.
    fn rows() -> Vec<(&'static str, &'static str)> {
        include_str!("../../docs/types.md")
            .lines()
            .filter_map(|l| l.strip_prefix("| ")?.strip_suffix(" |"))
            .filter_map(|l| Some((l.split(" | ").next()?, l.rsplit(" | ").next()?)))
            .collect()
    }

    /// A ClickHouse type as the table writes it: an array's element is `T`,
    /// a decimal's precision and scale `p, s`.
    fn as_documented(ty: &str) -> String {
        if ty.starts_with("Array(Nullable(") {
            return "Array(Nullable(T))".into();
        }
        match ty.find("Decimal(") {
            Some(at) => format!("{}Decimal(p, s){}", &ty[..at], &ty[at + ty[at..].find(')').unwrap() + 1..]),
            None => ty.to_owned(),
        }
    }

    #[test]
    fn every_type_has_a_row_naming_the_clickhouse_types_pg2ch_makes() {
        let rows = rows();
        for ty in samples() {
            let Some(&(_, ch_cell)) = rows.iter().find(|(first, _)| *first == row_of(&ty)) else {
                panic!("docs/types.md has no row {:?} for {ty:?}", row_of(&ty));
            };
            for caps in [Capabilities::from_parts(18, 16), Capabilities::from_parts(26, 9)] {
                for column in super::clickhouse::columns("c", &ty, false, &caps) {
                    let documented = as_documented(&column.ty);
                    assert!(
                        ch_cell.contains(&format!("{documented}`"))
                            || ch_cell.contains(&format!("{documented})`"))
                            || ch_cell.contains(&format!(" {documented}")),
                        "docs/types.md's row for {ty:?} does not name {documented} (ClickHouse {:?}): {ch_cell}",
                        caps.version
                    );
                }
            }
        }
    }
}
