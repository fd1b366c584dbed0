//! Gateway-less devices' state in DynamoDB: one item per device, `pk = dev#{ingest}#{device}`,
//! with the version `v`, the engine state `st` (binary) and the unsent events `unsent`. Every
//! write is conditional on `v`.

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
        Ok(DeviceItem {
            version: get_u64(&item, "v")?.context("device item without its version 'v'")?,
            state,
            unsent,
        })
    }

    async fn commit_item(
        &self,
        ingest: &str,
        device: &str,
        seen: u64,
        state: &[u8],
        unsent: &[Entry],
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
        req = if seen == 0 {
            req.condition_expression("attribute_not_exists(pk)")
        } else {
            req.condition_expression("v = :v")
                .expression_attribute_values(":v", n(seen))
        };
        conditional(req.send().await)
    }

    async fn clear(&self, ingest: &str, device: &str, version: u64) -> anyhow::Result<bool> {
        conditional(
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", pk(ingest, device))
                .update_expression("REMOVE unsent")
                .condition_expression("v = :v")
                .expression_attribute_values(":v", n(version))
                .send()
                .await,
        )
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
    ) -> BoxFuture<'a, bool> {
        Box::pin(self.commit_item(ingest, device, seen, state, unsent))
    }

    fn clear_unsent<'a>(
        &'a self,
        ingest: &'a str,
        device: &'a str,
        version: u64,
    ) -> BoxFuture<'a, bool> {
        Box::pin(self.clear(ingest, device, version))
    }
}
