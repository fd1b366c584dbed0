//! The DLQ as an SQS queue.

use anyhow::Context as _;
use aws_sdk_sqs::types::{
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use tokio::sync::OnceCell;

use super::client::err;
use crate::backend::{BoxFuture, DeadLetterQueue, Received};
use crate::dlq::DlqMessage;

#[derive(Debug)]
pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    name: String,
    url: OnceCell<String>,
}

impl SqsQueue {
    pub fn new(client: aws_sdk_sqs::Client, name: impl Into<String>) -> SqsQueue {
        SqsQueue {
            client,
            name: name.into(),
            url: OnceCell::new(),
        }
    }

    async fn url(&self) -> anyhow::Result<&str> {
        let url = self
            .url
            .get_or_try_init(|| async {
                let out = self
                    .client
                    .get_queue_url()
                    .queue_name(&self.name)
                    .send()
                    .await
                    .map_err(err)
                    .with_context(|| {
                        format!(
                            "SQS GetQueueUrl {} (run `cloud-bridge provision`?)",
                            self.name
                        )
                    })?;
                out.queue_url
                    .with_context(|| format!("SQS GetQueueUrl {}: no URL", self.name))
            })
            .await?;
        Ok(url)
    }

    async fn send_all(&self, messages: &[DlqMessage]) -> anyhow::Result<()> {
        let url = self.url().await?.to_string();
        for chunk in messages.chunks(10) {
            let mut entries = Vec::with_capacity(chunk.len());
            for (i, m) in chunk.iter().enumerate() {
                entries.push(
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(serde_json::to_string(m)?)
                        .build()
                        .map_err(err)?,
                );
            }
            let out = self
                .client
                .send_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(err)
                .with_context(|| format!("SQS SendMessageBatch {}", self.name))?;
            if let Some(f) = out.failed.first() {
                anyhow::bail!(
                    "SQS SendMessageBatch {}: {} of {} failed ({}: {})",
                    self.name,
                    out.failed.len(),
                    chunk.len(),
                    f.code,
                    f.message.as_deref().unwrap_or("")
                );
            }
        }
        Ok(())
    }

    async fn receive_some(
        &self,
        max: i32,
        wait_s: i32,
        visibility_s: i32,
    ) -> anyhow::Result<Vec<Received>> {
        let url = self.url().await?.to_string();
        let out = self
            .client
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(max.clamp(1, 10))
            .wait_time_seconds(wait_s.clamp(0, 20))
            .visibility_timeout(visibility_s.max(0))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(err)
            .with_context(|| format!("SQS ReceiveMessage {}", self.name))?;
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                let receive_count = m
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                Some(Received {
                    body: m.body?,
                    receipt: m.receipt_handle?,
                    receive_count,
                    message_id: m.message_id.unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn delete_one(&self, receipt: &str) -> anyhow::Result<()> {
        let url = self.url().await?.to_string();
        self.client
            .delete_message()
            .queue_url(&url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(err)
            .with_context(|| format!("SQS DeleteMessage {}", self.name))?;
        Ok(())
    }

    async fn depth_now(&self) -> anyhow::Result<(u64, u64)> {
        let url = self.url().await?.to_string();
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(err)
            .with_context(|| format!("SQS GetQueueAttributes {}", self.name))?;
        let get = |k: QueueAttributeName| {
            out.attributes
                .as_ref()
                .and_then(|a| a.get(&k))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok((
            get(QueueAttributeName::ApproximateNumberOfMessages),
            get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        ))
    }
}

impl DeadLetterQueue for SqsQueue {
    fn send<'a>(&'a self, messages: &'a [DlqMessage]) -> BoxFuture<'a, ()> {
        Box::pin(self.send_all(messages))
    }
    fn receive(&self, max: i32, wait_s: i32, visibility_s: i32) -> BoxFuture<'_, Vec<Received>> {
        Box::pin(self.receive_some(max, wait_s, visibility_s))
    }
    fn delete<'a>(&'a self, receipt: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.delete_one(receipt))
    }
    fn depth(&self) -> BoxFuture<'_, (u64, u64)> {
        Box::pin(self.depth_now())
    }
    fn location(&self) -> String {
        format!("sqs:{}", self.name)
    }
}
