//! `/v1/files`: training data uploaded for fine-tuning (OpenAI's Files API, purpose
//! `fine-tune`). JSONL is checked on upload; a bad line is a 400 naming the line and field.

use crate::error::ApiError;
use crate::store::{FileObject, StoreError};
use crate::tenants::Tenant;
use crate::AppState;
use axum::extract::{Multipart, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

/// The largest file accepted.
pub const MAX_FILE_BYTES: usize = 512 << 20;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_disk_full() {
            ApiError::insufficient_storage(e)
        } else if e.is_unavailable() {
            ApiError::store_unavailable(e)
        } else {
            ApiError::internal(e)
        }
    }
}

pub async fn upload(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    mut form: Multipart,
) -> Result<Json<crate::store::FileObject>, ApiError> {
    let mut file: Option<(String, Vec<u8>)> = None;
    let mut purpose: Option<String> = None;
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::invalid(format!("Cannot read the multipart form: {e}"), None))?
    {
        match field.name() {
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let data = field.bytes().await.map_err(|e| {
                    ApiError::invalid(format!("Cannot read the file: {e}"), Some("file"))
                })?;
                file = Some((name, data.to_vec()));
            }
            Some("purpose") => {
                let text = field.text().await.map_err(|e| {
                    ApiError::invalid(format!("Cannot read `purpose`: {e}"), Some("purpose"))
                })?;
                purpose = Some(text);
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| {
        ApiError::invalid("Missing required parameter: 'purpose'.", Some("purpose"))
    })?;
    if purpose != "fine-tune" {
        return Err(ApiError::invalid(
            format!("purpose `{purpose}` is not supported: tandem stores files for `fine-tune`"),
            Some("purpose"),
        ));
    }
    let (name, data) =
        file.ok_or_else(|| ApiError::invalid("Missing required parameter: 'file'.", Some("file")))?;
    let text = std::str::from_utf8(&data).map_err(|_| {
        ApiError::invalid(
            format!("File {name} is not UTF-8 text (JSONL expected)"),
            Some("file"),
        )
    })?;
    tandem_model::finetune::validate_file(text).map_err(|e| {
        ApiError::invalid(
            format!("Invalid file format for fine-tuning: {name}: {e}"),
            Some("file"),
        )
    })?;
    let f = st.store.add_file(&t.name, &name, &purpose, &data).await?;
    tracing::info!(file = %f.id, bytes = f.bytes, "file uploaded");
    Ok(Json(f))
}

#[derive(Deserialize)]
pub struct ListQuery {
    purpose: Option<String>,
}

pub async fn list(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let data: Vec<FileObject> = st
        .store
        .files(q.purpose.as_deref())
        .await?
        .into_iter()
        .filter(|f| t.sees(Some(&f.owner)))
        .collect();
    Ok(Json(json!({"object": "list", "data": data, "has_more": false})).into_response())
}

fn missing(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}"), Some("id"))
}

/// File `id` if it exists and the tenant may see it (another tenant's file is a 404 too).
pub async fn visible_file(
    st: &AppState,
    t: &Tenant,
    id: &str,
) -> Result<Option<FileObject>, ApiError> {
    Ok(st.store.file(id).await?.filter(|f| t.sees(Some(&f.owner))))
}

pub async fn get_one(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let f = visible_file(&st, &t, &id)
        .await?
        .ok_or_else(|| missing(&id))?;
    Ok(Json(f).into_response())
}

pub async fn content(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    visible_file(&st, &t, &id)
        .await?
        .ok_or_else(|| missing(&id))?;
    let data = st
        .store
        .file_content(&id)
        .await?
        .ok_or_else(|| missing(&id))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        data,
    )
        .into_response())
}

pub async fn delete(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if visible_file(&st, &t, &id).await?.is_none() || !st.store.delete_file(&id).await? {
        return Err(missing(&id));
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
}
