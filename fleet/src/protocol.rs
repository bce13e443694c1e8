//! The Redis side: reading stream replies, creating the group, and the script that stores a result and
//! acknowledges its job in one step.

use std::sync::OnceLock;

use redis::{Connection, RedisResult, Script, Value};

use crate::keys::GROUP;

/// One stream entry: its id and its field / value pairs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub id: String,
    pub fields: Vec<(String, Vec<u8>)>,
}

impl Entry {
    /// A field's value.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }

    /// A field's value as text (`None` when missing or not UTF-8).
    pub fn text(&self, name: &str) -> Option<String> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok()).map(str::to_owned)
    }
}

/// A reply element as bytes.
pub(crate) fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.clone().into_bytes()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b).ok())
}

fn items(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

/// `[id, [field, value, ...]]`; `None` for a nil (an entry deleted while pending, Redis 6.2).
fn entry(v: &Value) -> Option<Entry> {
    let parts = items(v)?;
    let id = text(parts.first()?)?;
    let mut fields = Vec::new();
    match parts.get(1)? {
        Value::Map(pairs) => {
            for (k, v) in pairs {
                fields.push((text(k)?, bytes(v)?));
            }
        }
        other => {
            for pair in items(other)?.chunks(2) {
                if let [k, v] = pair {
                    fields.push((text(k)?, bytes(v)?));
                }
            }
        }
    }
    Some(Entry { id, fields })
}

fn entries(v: &Value) -> Vec<Entry> {
    items(v).map(|list| list.iter().filter_map(entry).collect()).unwrap_or_default()
}

/// An `XREAD` / `XREADGROUP` reply: per stream, its entries (nil, on a timeout, is no stream).
pub(crate) fn read_reply(v: &Value) -> Vec<(String, Vec<Entry>)> {
    match v {
        Value::Map(pairs) => pairs.iter().filter_map(|(k, v)| Some((text(k)?, entries(v)))).collect(),
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| {
                let parts = items(s)?;
                Some((text(parts.first()?)?, entries(parts.get(1)?)))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// An `XAUTOCLAIM` reply: the next cursor and the claimed entries.
pub(crate) fn autoclaim_reply(v: &Value) -> Option<(String, Vec<Entry>)> {
    let parts = items(v)?;
    Some((text(parts.first()?)?, entries(parts.get(1)?)))
}

/// An `XRANGE` reply.
pub(crate) fn range_reply(v: &Value) -> Vec<Entry> {
    entries(v)
}

/// Creates the consumer group of `stream` (and the stream) if it does not exist. The group starts at the
/// stream's beginning, so jobs enqueued before the first worker started are read too.
pub(crate) fn ensure_group(conn: &mut Connection, stream: &str) -> RedisResult<()> {
    let r: RedisResult<()> =
        redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(GROUP).arg("0").arg("MKSTREAM").query(conn);
    match r {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// The delivery count of one pending entry (`XPENDING stream group id id 1`); `None` when it is not pending.
pub(crate) fn delivery_count(conn: &mut Connection, stream: &str, id: &str) -> RedisResult<Option<u64>> {
    let v: Value = redis::cmd("XPENDING").arg(stream).arg(GROUP).arg(id).arg(id).arg(1).query(conn)?;
    let first = items(&v).and_then(|list| list.first()).and_then(items);
    Ok(first.and_then(|p| p.get(3)).and_then(text).and_then(|n| n.parse().ok()))
}

/// Stores a result and acknowledges its job, atomically: when the result hash does not exist yet it is written
/// (`result` JSON and `png:<k>` images, with a TTL), the job is copied to the dead-letter stream when asked, and
/// the `done` event is appended to the progress stream; then, in every case, the entry is acknowledged and
/// deleted from the job stream. Returns 1 when this call stored the result, 0 when one was stored before (a
/// retried job): a result is never overwritten.
///
/// KEYS: result, jobs, progress, dead. ARGV: group, entry id, ttl seconds, progress maxlen, status, result JSON,
/// dead-letter ("1" / "0"), job id, the job's raw JSON, deliveries, image count, images...
const STORE: &str = r"
local stored = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  local fields = {'result', ARGV[6]}
  local n = tonumber(ARGV[11])
  for i = 1, n do
    fields[#fields + 1] = 'png:' .. (i - 1)
    fields[#fields + 1] = ARGV[11 + i]
  end
  redis.call('HSET', KEYS[1], unpack(fields))
  local ttl = tonumber(ARGV[3])
  if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
  if ARGV[7] == '1' then
    redis.call('XADD', KEYS[4], '*', 'id', ARGV[8], 'entry', ARGV[2], 'deliveries', ARGV[10], 'job', ARGV[9])
  end
  redis.call('XADD', KEYS[3], 'MAXLEN', tonumber(ARGV[4]), '*', 'event', 'done', 'status', ARGV[5])
  if ttl > 0 then redis.call('EXPIRE', KEYS[3], ttl) end
  stored = 1
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return stored
";

pub(crate) fn store_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(STORE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn replies_are_read_in_both_protocols() {
        let e = Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("id"), bulk("j1"), bulk("job"), bulk("{}")])]);
        let resp2 = Value::Array(vec![Value::Array(vec![bulk("s"), Value::Array(vec![e.clone(), Value::Nil])])]);
        let got = read_reply(&resp2);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1[0].text("id").as_deref(), Some("j1"));
        assert_eq!(got[0].1[0].get("job"), Some(&b"{}"[..]));
        let resp3 = Value::Map(vec![(bulk("s"), Value::Array(vec![e.clone()]))]);
        assert_eq!(read_reply(&resp3), got);
        assert!(read_reply(&Value::Nil).is_empty());
        let claim = Value::Array(vec![bulk("0-0"), Value::Array(vec![e]), Value::Array(vec![])]);
        let (cursor, claimed) = autoclaim_reply(&claim).unwrap();
        assert_eq!((cursor.as_str(), claimed.len()), ("0-0", 1));
    }
}
