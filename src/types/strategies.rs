//! Test-only generators: every type pg2ch carries, and for each the whole
//! domain PostgreSQL admits (its ends, infinities, NaN payloads, negative
//! zero, subnormals, NULL, huge numerics, any text including invalid UTF-8,
//! arrays of any shape), not values near today.

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

use super::time::{PG_DATE_MAX, PG_DATE_MIN, PG_EPOCH_UNIX_US, PG_TIMESTAMP_MAX, PG_TIMESTAMP_MIN};
use super::{Array, PgType, Value};

/// The configuration of every property test: `cases` cases, failures
/// kept in `proptest-regressions/` and replayed first on every run (proptest
/// prints the seed and the shrunk case on failure).
pub fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel("proptest-regressions"))),
        ..Config::default()
    }
}

/// Any scalar type (not an array).
pub fn scalar_type() -> impl Strategy<Value = PgType> {
    let numeric = prop_oneof![
        Just(None),
        (1..=40i32, -5..=45i32).prop_map(|(p, s)| Some((p, s))),
        (1..=38i32).prop_flat_map(|p| (Just(p), 0..=p)).prop_map(Some),
    ];
    prop_oneof![
        Just(PgType::Bool),
        Just(PgType::Int2),
        Just(PgType::Int4),
        Just(PgType::Int8),
        Just(PgType::Float4),
        Just(PgType::Float8),
        numeric.prop_map(PgType::Numeric),
        Just(PgType::Text),
        Just(PgType::Bpchar),
        Just(PgType::Bytea),
        Just(PgType::Uuid),
        Just(PgType::Date),
        Just(PgType::Timestamp),
        Just(PgType::Timestamptz),
        Just(PgType::Time),
        Just(PgType::Interval),
        Just(PgType::Json),
        Just(PgType::Jsonb),
        Just(PgType::Inet),
        Just(PgType::Cidr),
        Just(PgType::Enum),
        Just(PgType::Other("tsvector".into())),
    ]
}

/// Any type: a scalar or a one-dimensional array of one.
pub fn pg_type() -> impl Strategy<Value = PgType> {
    prop_oneof![4 => scalar_type(), 1 => scalar_type().prop_map(|e| PgType::Array(Box::new(e)))]
}

/// A type a primary key may hold.
pub fn key_type() -> impl Strategy<Value = PgType> {
    prop::sample::select(vec![
        PgType::Bool,
        PgType::Int2,
        PgType::Int4,
        PgType::Int8,
        PgType::Text,
        PgType::Bpchar,
        PgType::Bytea,
        PgType::Uuid,
        PgType::Date,
        PgType::Timestamp,
        PgType::Timestamptz,
    ])
}

/// A type and a value of it (NULL included).
pub fn typed_value() -> impl Strategy<Value = (PgType, Value)> {
    pg_type().prop_flat_map(|ty| (Just(ty.clone()), value_of(&ty, true)))
}

/// Any text: every control character, quotes, backslashes, any Unicode,
/// and now and then bytes that are not UTF-8 (a `SQL_ASCII` database).
pub fn text() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => any::<String>().prop_map(Value::Text),
        2 => "[\\x00-\\x1f\\x7f\"\\\\/ é\u{2028}\u{10ffff}]{0,20}".prop_map(Value::Text),
        1 => proptest::collection::vec(1u8.., 0..24).prop_map(Value::text),
    ]
}

/// What PostgreSQL writes for a numeric: no exponent, no leading zeros, any scale.
fn numeric_text(int_digits: usize, scale: usize) -> impl Strategy<Value = String> {
    (any::<bool>(), proptest::collection::vec(0u8..10, int_digits), proptest::collection::vec(0u8..10, scale)).prop_map(
        |(negative, int, frac)| {
            let int: String = int.iter().map(|d| char::from(b'0' + d)).collect::<String>();
            let int = int.trim_start_matches('0');
            let int = if int.is_empty() { "0" } else { int };
            let frac: String = frac.iter().map(|d| char::from(b'0' + d)).collect();
            let zero = int == "0" && frac.bytes().all(|c| c == b'0');
            let sign = if negative && !zero { "-" } else { "" };
            if frac.is_empty() { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") }
        },
    )
}

fn numeric(typmod: Option<(i32, i32)>) -> BoxedStrategy<Value> {
    let special = prop::sample::select(vec!["NaN", "Infinity", "-Infinity"]).prop_map(|s| Value::Numeric(s.into()));
    match typmod {
        Some((p, s)) if (0..=p).contains(&s) => {
            let (p, s) = (p as usize, s as usize);
            prop_oneof![
                8 => numeric_text(p - s, s).prop_map(Value::Numeric),
                1 => Just(Value::Numeric("NaN".into())),
            ]
            .boxed()
        }
        // A negative scale, or a scale above the precision (PostgreSQL 15).
        Some((p, s)) => {
            let scale = s.max(0) as usize;
            numeric_text((p - s).clamp(0, 40) as usize, scale).prop_map(Value::Numeric).boxed()
        }
        None => prop_oneof![
            6 => (0..40usize, 0..40usize).prop_flat_map(|(i, s)| numeric_text(i, s)).prop_map(Value::Numeric),
            1 => (100..1200usize).prop_flat_map(|i| numeric_text(i, 3)).prop_map(Value::Numeric),
            1 => (0..3usize).prop_flat_map(|i| numeric_text(i, 16_383)).prop_map(Value::Numeric),
            1 => special,
        ]
        .boxed(),
    }
}

fn timestamp() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (PG_TIMESTAMP_MIN..=PG_TIMESTAMP_MAX).prop_map(Value::Timestamp),
        2 => (-1_000_000_000_000_000i64..1_000_000_000_000_000).prop_map(Value::Timestamp),
        1 => prop::sample::select(vec![
            i64::MAX,
            i64::MIN,
            PG_TIMESTAMP_MIN,
            PG_TIMESTAMP_MAX,
            i64::MAX - PG_EPOCH_UNIX_US,
            i64::MAX - PG_EPOCH_UNIX_US + 1,
            -PG_EPOCH_UNIX_US,
            0,
        ])
        .prop_map(Value::Timestamp),
    ]
}

fn date() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (PG_DATE_MIN..=PG_DATE_MAX).prop_map(Value::Date),
        2 => (-40_000..40_000i32).prop_map(Value::Date),
        1 => prop::sample::select(vec![i32::MAX, i32::MIN, PG_DATE_MIN, PG_DATE_MAX, 0, -10_957])
            .prop_map(Value::Date),
    ]
}

/// Times as PostgreSQL writes them, `24:00:00` included.
fn time_text() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0..24u32, 0..60u32, 0..60u32, prop::option::of(0..1_000_000u32)).prop_map(|(h, m, s, us)| {
            let frac = us.map(|us| format!(".{us:06}").trim_end_matches('0').to_owned()).unwrap_or_default();
            let frac = if frac == "." { String::new() } else { frac };
            Value::Text(format!("{h:02}:{m:02}:{s:02}{frac}"))
        }),
        Just(Value::Text("24:00:00".into())),
    ]
}

/// A value of `ty`: its whole domain, and NULL when `nullable`.
pub fn value_of(ty: &PgType, nullable: bool) -> BoxedStrategy<Value> {
    let value: BoxedStrategy<Value> = match ty {
        PgType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        PgType::Int2 => any::<i16>().prop_map(|i| Value::Int(i.into())).boxed(),
        PgType::Int4 => any::<i32>().prop_map(|i| Value::Int(i.into())).boxed(),
        PgType::Int8 => {
            prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX), -3..3i64].prop_map(Value::Int).boxed()
        }
        PgType::Float4 => prop_oneof![
            any::<u32>().prop_map(f32::from_bits),
            prop::sample::select(vec![
                0.0f32,
                -0.0,
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MIN_POSITIVE,
                f32::MAX,
                0.1
            ]),
        ]
        .prop_map(Value::Float4)
        .boxed(),
        PgType::Float8 => prop_oneof![
            any::<u64>().prop_map(f64::from_bits),
            prop::sample::select(vec![
                0.0f64,
                -0.0,
                f64::NAN,
                -f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                5e-324,
                f64::MAX,
                0.1
            ]),
        ]
        .prop_map(Value::Float8)
        .boxed(),
        PgType::Numeric(typmod) => numeric(*typmod),
        PgType::Text | PgType::Json | PgType::Jsonb | PgType::Enum | PgType::Other(_) | PgType::Inet | PgType::Cidr => {
            text().boxed()
        }
        PgType::Interval => prop_oneof![
            text(),
            (any::<i32>(), any::<i32>(), any::<i64>()).prop_map(|(mo, d, us)| Value::Text(format!(
                "P{mo}M{d}DT{}.{:06}S",
                us / 1_000_000,
                (us % 1_000_000).abs()
            ))),
        ]
        .boxed(),
        PgType::Bpchar => prop_oneof![text(), "[a-z]{0,4} {0,4}".prop_map(Value::Text)].boxed(),
        PgType::Bytea => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytea).boxed(),
        PgType::Uuid => any::<[u8; 16]>().prop_map(Value::Uuid).boxed(),
        PgType::Date => date().boxed(),
        PgType::Timestamp | PgType::Timestamptz => timestamp().boxed(),
        PgType::Time => time_text().boxed(),
        PgType::Array(element) => {
            let one = value_of(element, true);
            prop_oneof![
                8 => proptest::collection::vec(one.clone(), 0..6).prop_map(|e| Value::Array(Array::list(e))),
                // What only a declared one-dimensional column can still hold.
                1 => proptest::collection::vec(one.clone(), 4).prop_map(|e| Value::Array(Array { dims: vec![(2, 1), (2, 1)], elements: e })),
                1 => (one, -3..3i32).prop_filter("not 1", |(_, l)| *l != 1)
                    .prop_map(|(e, lower)| Value::Array(Array { dims: vec![(1, lower)], elements: vec![e] })),
            ]
            .boxed()
        }
    };
    if nullable { prop_oneof![8 => value, 1 => Just(Value::Null)].boxed() } else { value }
}
