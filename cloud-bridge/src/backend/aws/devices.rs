//! Gateway-less devices' state in DynamoDB: one item per device, `pk = dev#{ingest}#{device}`,
//! with the version `v`, the engine state `st` (binary) and the unsent events `unsent`. Every
//! write is conditional on `v`.
//!
//! An item with something to do without a message of its device (a gap to declare, events to
//! publish) also carries `sweep = {ingest}` and `due` (epoch ms): the keys of the sparse
//! global secondary index [`SWEEP_INDEX`], so the sweep queries exactly the due devices
//! instead of scanning a table that also holds every gateway's records.

use anyhow::Context as _;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;

use super::client::{conditional, err, get_u64, n, s};
use crate::backend::{BoxFuture, DeviceItem, DeviceStore, Entry, decode_entries, encode_entries};

#[derive(Clone, Debug)]
pub struct DeviceTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

/// The sparse index of due items: partition key `sweep` (S), sort key `due` (N).
pub const SWEEP_INDEX: &str = "sweep-due";

fn pk(ingest: &str, device: &str) -> AttributeValue {
    s(format!("dev#{ingest}#{device}"))
}

impl DeviceTable {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        DeviceTable {
            client,
            table: table.into(),
        }
    }

    async fn read_item(&self, ingest: &str, device: &str) -> anyhow::Result<DeviceItem> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", pk(ingest, device))
            .consistent_read(true)
            .send()
            .await
            .map_err(err)
            .with_context(|| format!("DynamoDB GetItem {} (device {device})", self.table))?;
        let Some(item) = out.item else {
            return Ok(DeviceItem::default());
        };
        let state = match item.get("st") {
            Some(AttributeValue::B(b)) => b.clone().into_inner(),
            _ => Vec::new(),
        };
        let unsent = match item.get("unsent") {
            Some(AttributeValue::S(t)) => decode_entries(t)?,
            _ => Vec::new(),
        };
        let due = match item.get("due") {
            Some(AttributeValue::N(t)) => {
                Some(t.parse().context("device item: 'due' is not an integer")?)
            }
            _ => None,
        };
        Ok(DeviceItem {
            version: get_u64(&item, "v")?.context("device item without its version 'v'")?,
            state,
            unsent,
            due,
        })
    }

    async fn commit_item(
        &self,
        ingest: &str,
        device: &str,
        seen: u64,
        state: &[u8],
        unsent: &[Entry],
        due: Option<i64>,
    ) -> anyhow::Result<bool> {
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", pk(ingest, device))
            .item("v", n(seen + 1))
            .item("st", AttributeValue::B(Blob::new(state.to_vec())));
        if !unsent.is_empty() {
            req = req.item("unsent", s(encode_entries(unsent)));
        }
        if let Some(due) = due {
            req = req.item("sweep", s(ingest)).item("due", n(due));
        }
        req = if seen == 0 {
            req.condition_expression("attribute_not_exists(pk)")
        } else {
            req.condition_expression("v = :v")
                .expression_attribute_values(":v", n(seen))
        };
        conditional(req.send().await)
    }

    async fn clear(
        &self,
        ingest: &str,
        device: &str,
        version: u64,
        due: Option<i64>,
    ) -> anyhow::Result<bool> {
        let req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", pk(ingest, device))
            .condition_expression("v = :v")
            .expression_attribute_values(":v", n(version));
        let req = match due {
            Some(due) => req
                .update_expression("REMOVE unsent SET sweep = :i, due = :d")
                .expression_attribute_values(":i", s(ingest))
                .expression_attribute_values(":d", n(due)),
            None => req.update_expression("REMOVE unsent, sweep, due"),
        };
        conditional(req.send().await)
    }

    async fn set_due(
        &self,
        ingest: &str,
        device: &str,
        version: u64,
        due: i64,
    ) -> anyhow::Result<bool> {
        conditional(
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", pk(ingest, device))
                .update_expression("SET sweep = :i, due = :d")
                .condition_expression("v = :v")
                .expression_attribute_values(":v", n(version))
                .expression_attribute_values(":i", s(ingest))
                .expression_attribute_values(":d", n(due))
                .send()
                .await,
        )
    }

    async fn query_due(&self, ingest: &str, now: i64, limit: usize) -> anyhow::Result<Vec<String>> {
        let prefix = format!("dev#{ingest}#");
        let mut out = Vec::new();
        let mut start = None;
        while out.len() < limit {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(SWEEP_INDEX)
                .key_condition_expression("sweep = :i AND due <= :now")
                .expression_attribute_values(":i", s(ingest))
                .expression_attribute_values(":now", n(now))
                .set_exclusive_start_key(start)
                .limit(i32::try_from(limit - out.len()).unwrap_or(i32::MAX))
                .send()
                .await
                .map_err(err)
                .with_context(|| {
                    format!(
                        "DynamoDB Query {} index {SWEEP_INDEX} (missing? `cloud-bridge provision` adds it)",
                        self.table
                    )
                })?;
            out.extend(page.items().iter().filter_map(|item| match item.get("pk") {
                Some(AttributeValue::S(k)) => k.strip_prefix(&prefix).map(String::from),
                _ => None,
            }));
            start = page.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        Ok(out)
    }
}

impl DeviceStore for DeviceTable {
    fn read<'a>(&'a self, ingest: &'a str, device: &'a str) -> BoxFuture<'a, DeviceItem> {
        Box::pin(self.read_item(ingest, device))
    }

    fn commit<'a>(
        &'a self,
        ingest: &'a str,
        device: &'a str,
        seen: u64,
        state: &'a [u8],
        unsent: &'a [Entry],
        due: Option<i64>,
    ) -> BoxFuture<'a, bool> {
        Box::pin(self.commit_item(ingest, device, seen, state, unsent, due))
    }

    fn clear_unsent<'a>(
        &'a self,
        ingest: &'a str,
        device: &'a str,
        version: u64,
        due: Option<i64>,
    ) -> BoxFuture<'a, bool> {
        Box::pin(self.clear(ingest, device, version, due))
    }

    fn mark_due<'a>(
        &'a self,
        ingest: &'a str,
        device: &'a str,
        version: u64,
        due: i64,
    ) -> BoxFuture<'a, bool> {
        Box::pin(self.set_due(ingest, device, version, due))
    }

    fn due<'a>(&'a self, ingest: &'a str, now: i64, limit: usize) -> BoxFuture<'a, Vec<String>> {
        Box::pin(self.query_due(ingest, now, limit))
    }
}
