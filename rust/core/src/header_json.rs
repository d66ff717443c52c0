//! Typed, borrowing deserialisation of safetensors headers and index files: the fast path.
//!
//! A header is read in one pass into borrowed names and fixed fields (no generic JSON tree, no
//! copied keys). Only well-formed input goes through here: anything this reader does not accept
//! exactly as expected (wrong JSON types, repeated keys, escapes it cannot borrow past, ...) returns
//! `None`, and the caller asks the reference reader in `safetensors.rs` to accept it or to name the
//! fault. So the messages stay those of one reader, and this one only has to agree with it on
//! valid input.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt;

/// A JSON string, borrowed from the input unless it holds escapes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Text<'a>(pub(crate) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor(std::marker::PhantomData))
    }
}

/// One tensor's header entry, exactly the fields safetensors reads (others are skipped).
#[derive(Debug, Deserialize)]
pub(crate) struct RawTensor<'a> {
    #[serde(borrow)]
    pub(crate) dtype: Text<'a>,
    pub(crate) shape: Vec<u64>,
    pub(crate) data_offsets: [u64; 2],
}

/// The tensors of one header in document order; `__metadata__` checked (null or strings to strings)
/// and left out. `None`: not a plain well-formed header (see the module docs).
pub(crate) fn parse_header(text: &str) -> Option<Vec<(Text<'_>, RawTensor<'_>)>> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let tensors = deserializer.deserialize_map(HeaderVisitor).ok()?;
    deserializer.end().ok()?;
    Some(tensors)
}

struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = Vec<(Text<'de>, RawTensor<'de>)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a safetensors header object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut tensors = Vec::with_capacity(map.size_hint().unwrap_or(0));
        let mut metadata_seen = false;
        while let Some(name) = map.next_key::<Text<'de>>()? {
            if name.0 == "__metadata__" {
                if std::mem::replace(&mut metadata_seen, true) {
                    return Err(de::Error::custom("repeated __metadata__"));
                }
                map.next_value::<Option<StringMap>>()?;
            } else {
                tensors.push((name, map.next_value::<RawTensor<'de>>()?));
            }
        }
        Ok(tensors)
    }
}

/// A JSON object whose values are all strings (safetensors' `__metadata__`), checked and dropped.
struct StringMap;

impl<'de> Deserialize<'de> for StringMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StringMapVisitor;
        impl<'de> Visitor<'de> for StringMapVisitor {
            type Value = StringMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringMap, A::Error> {
                while map.next_entry::<IgnoredAny, Text<'de>>()?.is_some() {}
                Ok(StringMap)
            }
        }
        deserializer.deserialize_map(StringMapVisitor)
    }
}

/// The `weight_map` of a `model.safetensors.index.json` as (tensor, shard) pairs in document order,
/// repeats kept; other members of the index are skipped. `None`: not a plain well-formed index.
pub(crate) fn parse_index(text: &str) -> Option<Vec<(Text<'_>, Text<'_>)>> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let pairs = deserializer.deserialize_map(IndexVisitor).ok()?;
    deserializer.end().ok()?;
    pairs
}

struct IndexVisitor;

impl<'de> Visitor<'de> for IndexVisitor {
    /// `None` when the index has no `weight_map` or more than one.
    type Value = Option<Vec<(Text<'de>, Text<'de>)>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a safetensors index object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut weight_map = None;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            if key.0 != "weight_map" {
                map.next_value::<IgnoredAny>()?;
            } else if weight_map.is_some() {
                return Err(de::Error::custom("repeated weight_map"));
            } else {
                weight_map = Some(map.next_value_seed(PairsSeed)?);
            }
        }
        Ok(weight_map)
    }
}

/// An object of string values read as its (key, value) pairs.
struct PairsSeed;

impl<'de> DeserializeSeed<'de> for PairsSeed {
    type Value = Vec<(Text<'de>, Text<'de>)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PairsSeed {
    type Value = Vec<(Text<'de>, Text<'de>)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(pair) = map.next_entry::<Text<'de>, Text<'de>>()? {
            pairs.push(pair);
        }
        Ok(pairs)
    }

    // Never called by serde_json for an object; here so a sequence is a clean refusal.
    fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom("weight_map is a list"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_headers_and_declines_everything_else() {
        let ok = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":[1]},"__metadata__":{"k":"v"},"a\"q":{"dtype":"U8","shape":[],"data_offsets":[8,9]}}"#;
        let tensors = parse_header(ok).unwrap();
        assert_eq!(tensors.len(), 2);
        assert_eq!(tensors[0].0 .0, "b");
        assert!(matches!(tensors[0].0 .0, Cow::Borrowed(_)));
        assert_eq!(tensors[1].0 .0, "a\"q");
        assert_eq!(tensors[1].1.data_offsets, [8, 9]);
        assert!(parse_header(r#"{"__metadata__":null}"#).unwrap().is_empty());
        for declined in [
            r#"[1]"#,
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} x"#,
            r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#,
            r#"{"a":{"dtype":7,"shape":[1],"data_offsets":[0,4]}}"#,
            r#"{"a":{"shape":[1],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            r#"{"a":3}"#,
            r#"{"__metadata__":{"k":1}}"#,
            r#"{"__metadata__":{},"__metadata__":{}}"#,
        ] {
            assert!(parse_header(declined).is_none(), "{declined}");
        }
    }

    #[test]
    fn reads_the_weight_map_of_an_index_and_declines_odd_ones() {
        let pairs = parse_index(r#"{"metadata":{"total_size":8},"weight_map":{"a":"x.safetensors","a":"y"}}"#).unwrap();
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(t, s)| (&*t.0, &*s.0)).collect();
        assert_eq!(pairs, vec![("a", "x.safetensors"), ("a", "y")]);
        for declined in [
            r#"{"metadata":{}}"#,
            r#"{"weight_map":[]}"#,
            r#"{"weight_map":{"a":1}}"#,
            r#"{"weight_map":{},"weight_map":{}}"#,
            r#"[]"#,
        ] {
            assert!(parse_index(declined).is_none(), "{declined}");
        }
    }
}
