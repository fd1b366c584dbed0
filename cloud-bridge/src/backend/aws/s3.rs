//! S3: the bridge's objects in `aws.bucket`.

use anyhow::Context as _;
use aws_sdk_s3::primitives::ByteStream;

use super::client::err;
use crate::backend::{BoxFuture, ObjectStore};

#[derive(Clone, Debug)]
pub struct S3Objects {
    s3: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Objects {
    pub fn new(s3: aws_sdk_s3::Client, bucket: String) -> Self {
        S3Objects { s3, bucket }
    }

    pub async fn put_object(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> anyhow::Result<()> {
        self.s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(err)
            .with_context(|| format!("S3 PutObject s3://{}/{key}", self.bucket))?;
        Ok(())
    }

    pub async fn delete_object(&self, key: &str) -> anyhow::Result<()> {
        self.s3
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(err)
            .with_context(|| format!("S3 DeleteObject s3://{}/{key}", self.bucket))?;
        Ok(())
    }

    pub async fn list_objects(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut pages = self
            .s3
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page
                .map_err(err)
                .with_context(|| format!("S3 ListObjectsV2 s3://{}/{prefix}", self.bucket))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from)),
            );
        }
        keys.sort();
        Ok(keys)
    }
}

impl ObjectStore for S3Objects {
    fn put<'a>(&'a self, key: &'a str, body: Vec<u8>, content_type: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.put_object(key, body, content_type))
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.delete_object(key))
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Vec<String>> {
        Box::pin(self.list_objects(prefix))
    }
    fn location(&self) -> String {
        format!("s3://{}", self.bucket)
    }
    fn get_versioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<(Vec<u8>, String)>> {
        Box::pin(self.get_object_versioned(key))
    }
    fn put_if_match<'a>(
        &'a self,
        key: &'a str,
        body: Vec<u8>,
        content_type: &'a str,
        etag: &'a str,
    ) -> BoxFuture<'a, bool> {
        Box::pin(self.put_object_if_match(key, body, content_type, etag))
    }
}

impl S3Objects {
    async fn get_object_versioned(&self, key: &str) -> anyhow::Result<Option<(Vec<u8>, String)>> {
        let out = match self
            .s3
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|se| se.is_no_such_key()) => {
                return Ok(None);
            }
            Err(e) => {
                return Err(err(e))
                    .with_context(|| format!("S3 GetObject s3://{}/{key}", self.bucket));
            }
        };
        let etag = out.e_tag().unwrap_or_default().to_string();
        let body = out
            .body
            .collect()
            .await
            .with_context(|| format!("S3 GetObject s3://{}/{key}: reading the body", self.bucket))?
            .into_bytes()
            .to_vec();
        Ok(Some((body, etag)))
    }

    async fn put_object_if_match(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        etag: &str,
    ) -> anyhow::Result<bool> {
        let res = self
            .s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .if_match(etag)
            .body(ByteStream::from(body))
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 412) => Ok(false),
            Err(e) => Err(err(e))
                .with_context(|| format!("S3 PutObject (If-Match) s3://{}/{key}", self.bucket)),
        }
    }
}
