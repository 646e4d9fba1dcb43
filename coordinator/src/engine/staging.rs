//! The staging-buffer pool: a bounded number of update-sized buffers that uploads are
//! checked into before they fold, so memory does not grow with the number of sites.

use super::*;

/// The most uploads of one model size staged at once, whatever the staging budget: so
/// also the most whole updates one batched fold of the group commit can take.
pub const MAX_STAGED_UPDATES: usize = 64;

/// A pool of model-sized buffers in which uploads are decoded and checked before they
/// are folded. The number of buffers is the staging budget divided by the model size
/// (at least one), so coordinator memory stays O(model) whatever the number of sites;
/// buffers are reused, since writing fresh pages is ten times slower than reused ones.
#[derive(Debug)]
pub struct Staging {
    pub(super) budget_bytes: u64,
    pub(super) permits: Mutex<HashMap<u64, Arc<Semaphore>>>,
    pub(super) buffers: Mutex<Vec<Vec<f32>>>,
}

/// A staging buffer on loan; returned to the pool on drop.
#[derive(Debug)]
pub struct StagingBuffer {
    pub values: Vec<f32>,
    pub(super) pool: Arc<Engine>,
    pub(super) _permit: OwnedSemaphorePermit,
}

impl Drop for StagingBuffer {
    fn drop(&mut self) {
        let values = std::mem::take(&mut self.values);
        let mut buffers = self.pool.staging.buffers.lock().unwrap_or_else(|p| p.into_inner());
        if buffers.len() < MAX_STAGED_UPDATES {
            buffers.push(values);
        }
    }
}

impl Engine {
    /// Lends a staging buffer of `len` values, waiting while the budget is in use.
    pub async fn staging_buffer(self: &Arc<Self>, len: usize) -> Result<StagingBuffer, ServiceError> {
        let permit = self.staging_permit(len).await?;
        let mut values = lock(&self.staging.buffers).pop().unwrap_or_default();
        values.clear();
        values.resize(len, 0.0);
        Ok(StagingBuffer {
            values,
            pool: self.clone(),
            _permit: permit,
        })
    }

    /// Room for one upload of `len` values in the staging budget: held while its
    /// received chunks are kept, so memory stays bounded whatever the number of sites.
    pub async fn staging_permit(&self, len: usize) -> Result<OwnedSemaphorePermit, ServiceError> {
        let model_bytes = (len as u64 * 4).max(1);
        let semaphore = {
            let permits = (self.staging.budget_bytes / model_bytes).clamp(1, MAX_STAGED_UPDATES as u64) as usize;
            lock(&self.staging.permits)
                .entry(model_bytes)
                .or_insert_with(|| Arc::new(Semaphore::new(permits)))
                .clone()
        };
        semaphore
            .acquire_owned()
            .await
            .map_err(|_| ServiceError::Unavailable("the coordinator is not taking uploads now; retry".into()))
    }
}
