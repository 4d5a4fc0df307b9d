//! pg2ch addition: DescribeConfigs (API key 32), versions 1 and 2, which
//! share one layout (version 0 is gone from Kafka 4; version 4 is the
//! flexible encoding). Enough to read a topic's effective configuration,
//! say `min.insync.replicas`.

use std::io::{Read, Write};

use super::{
    ReadVersionedError, ReadVersionedType, RequestBody, WriteVersionedError, WriteVersionedType,
    read_versioned_array, write_versioned_array,
};
use crate::protocol::{
    api_key::ApiKey,
    api_version::{ApiVersion, ApiVersionRange},
    error::Error,
    primitives::*,
    traits::{ReadType, WriteType},
};

/// The resource type of a topic.
pub const RESOURCE_TYPE_TOPIC: i8 = 2;

#[derive(Debug)]
pub struct DescribeConfigsRequest {
    /// The resources whose configurations to describe.
    pub resources: Vec<DescribeConfigsResource>,

    /// Whether to include the synonyms of each configuration (here: false).
    pub include_synonyms: Boolean,
}

impl RequestBody for DescribeConfigsRequest {
    type ResponseBody = DescribeConfigsResponse;

    const API_KEY: ApiKey = ApiKey::DescribeConfigs;

    const API_VERSION_RANGE: ApiVersionRange =
        ApiVersionRange::new(ApiVersion(Int16(1)), ApiVersion(Int16(2)));

    const FIRST_TAGGED_FIELD_IN_REQUEST_VERSION: ApiVersion = ApiVersion(Int16(4));
}

impl<W: Write> WriteVersionedType<W> for DescribeConfigsRequest {
    fn write_versioned(
        &self,
        writer: &mut W,
        version: ApiVersion,
    ) -> Result<(), WriteVersionedError> {
        let v = version.0.0;
        assert!((1..=2).contains(&v));
        write_versioned_array(writer, version, Some(self.resources.as_slice()))?;
        self.include_synonyms.write(writer)?;
        Ok(())
    }
}

#[derive(Debug)]
pub struct DescribeConfigsResource {
    /// The resource type (2: a topic).
    pub resource_type: Int8,

    /// The resource name.
    pub resource_name: String_,

    /// The configuration keys to list, or null to list them all.
    pub configuration_keys: Array<String_>,
}

impl<W: Write> WriteVersionedType<W> for DescribeConfigsResource {
    fn write_versioned(
        &self,
        writer: &mut W,
        _version: ApiVersion,
    ) -> Result<(), WriteVersionedError> {
        self.resource_type.write(writer)?;
        self.resource_name.write(writer)?;
        self.configuration_keys.write(writer)?;
        Ok(())
    }
}

#[derive(Debug)]
pub struct DescribeConfigsResponse {
    /// How long the request was throttled for, in milliseconds.
    pub throttle_time_ms: Int32,

    /// One result per resource asked.
    pub results: Vec<DescribeConfigsResult>,
}

impl<R: Read> ReadVersionedType<R> for DescribeConfigsResponse {
    fn read_versioned(reader: &mut R, version: ApiVersion) -> Result<Self, ReadVersionedError> {
        let v = version.0.0;
        assert!((1..=2).contains(&v));
        let throttle_time_ms = Int32::read(reader)?;
        let results = read_versioned_array(reader, version)?.unwrap_or_default();
        Ok(Self {
            throttle_time_ms,
            results,
        })
    }
}

#[derive(Debug)]
pub struct DescribeConfigsResult {
    /// The error, if describing this resource failed.
    pub error: Option<Error>,

    /// The error message, if any.
    pub error_message: NullableString,

    /// The resource type.
    pub resource_type: Int8,

    /// The resource name.
    pub resource_name: String_,

    /// The resource's configurations.
    pub configs: Vec<DescribeConfigsEntry>,
}

impl<R: Read> ReadVersionedType<R> for DescribeConfigsResult {
    fn read_versioned(reader: &mut R, version: ApiVersion) -> Result<Self, ReadVersionedError> {
        let error = Error::new(Int16::read(reader)?.0);
        let error_message = NullableString::read(reader)?;
        let resource_type = Int8::read(reader)?;
        let resource_name = String_::read(reader)?;
        let configs = read_versioned_array(reader, version)?.unwrap_or_default();
        Ok(Self {
            error,
            error_message,
            resource_type,
            resource_name,
            configs,
        })
    }
}

#[derive(Debug)]
pub struct DescribeConfigsEntry {
    /// The configuration's name.
    pub name: String_,

    /// Its value (null when sensitive).
    pub value: NullableString,

    /// Whether it is read-only.
    pub read_only: Boolean,

    /// Where the value comes from (1: the topic's own, 5: the broker's default, ...).
    pub config_source: Int8,

    /// Whether it is sensitive.
    pub is_sensitive: Boolean,

    /// Its synonyms (empty unless asked for).
    pub synonyms: Vec<DescribeConfigsSynonym>,
}

impl<R: Read> ReadVersionedType<R> for DescribeConfigsEntry {
    fn read_versioned(reader: &mut R, version: ApiVersion) -> Result<Self, ReadVersionedError> {
        let name = String_::read(reader)?;
        let value = NullableString::read(reader)?;
        let read_only = Boolean::read(reader)?;
        let config_source = Int8::read(reader)?;
        let is_sensitive = Boolean::read(reader)?;
        let synonyms = read_versioned_array(reader, version)?.unwrap_or_default();
        Ok(Self {
            name,
            value,
            read_only,
            config_source,
            is_sensitive,
            synonyms,
        })
    }
}

#[derive(Debug)]
pub struct DescribeConfigsSynonym {
    pub name: String_,
    pub value: NullableString,
    pub source: Int8,
}

impl<R: Read> ReadVersionedType<R> for DescribeConfigsSynonym {
    fn read_versioned(reader: &mut R, _version: ApiVersion) -> Result<Self, ReadVersionedError> {
        Ok(Self {
            name: String_::read(reader)?,
            value: NullableString::read(reader)?,
            source: Int8::read(reader)?,
        })
    }
}
