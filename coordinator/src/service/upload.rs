//! UploadUpdate: a plain update streams through one `engine::Upload`; a masked input
//! (secure aggregation) is summed into its session.

use super::*;

/// Longest an upload may sit idle between two messages (slow-loris guard); the round's
/// deadline bounds the whole stream as well.
pub(super) const STREAM_IDLE: Duration = Duration::from_secs(30);

/// The next message of an upload stream, bounded by the idle limit and by `deadline`.
pub(super) async fn next_message(
    stream: &mut Streaming<pb::UpdateChunk>,
    deadline: Option<tokio::time::Instant>,
) -> Result<Option<pb::UpdateChunk>, Status> {
    let idle = tokio::time::Instant::now() + STREAM_IDLE;
    let until = deadline.map_or(idle, |d| d.min(idle));
    match tokio::time::timeout_at(until, stream.message()).await {
        Ok(message) => message,
        Err(_) if deadline.is_some_and(|d| d <= idle) => Err(Status::deadline_exceeded(
            "the round's deadline passed while the update was streaming",
        )),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the update stream sat idle for {} s",
            STREAM_IDLE.as_secs()
        ))),
    }
}

/// An update header as the engine takes it: text bounded, counts in range, and the
/// held-out totals (if any) checked to be counts of held-out rows.
pub(super) fn upload_header(header: pb::UpdateHeader) -> Result<UploadHeader, Status> {
    if header.num_examples == 0 || header.num_examples > 1_000_000_000 {
        return Err(Status::invalid_argument(format!(
            "num_examples = {} is outside 1..=10^9",
            header.num_examples
        )));
    }
    // The score bins are bounded by the message size (4 MiB) and checked below.
    let evaluation = match header.evaluation {
        None => None,
        Some(e) if e.noised.is_some() => {
            let n = e.noised.unwrap_or_default();
            let values = [n.persons, n.correct, n.loss_sum];
            if e.examples != 0 || e.correct != 0 || e.loss_sum != 0.0 || !e.score_bins.is_empty() {
                return Err(Status::invalid_argument(
                    "evaluation carries both noised totals and exact counts: under DP only the noised totals may leave a site",
                ));
            }
            if values.iter().any(|v| !(v.is_finite() && v.abs() <= 1e12)) {
                return Err(Status::invalid_argument(format!(
                    "noised evaluation totals must be finite numbers of at most 10^12 in size: persons {}, correct {}, loss sum {}",
                    n.persons, n.correct, n.loss_sum
                )));
            }
            Some(EvalCounts {
                examples: 0,
                correct: 0,
                loss_sum: 0.0,
                score_bins: Vec::new(),
                noised: Some(values),
            })
        }
        Some(e) => {
            if e.examples == 0
                || e.examples > 1_000_000_000
                || e.correct > e.examples
                || !(e.loss_sum.is_finite() && e.loss_sum >= 0.0)
            {
                return Err(Status::invalid_argument(format!(
                    "evaluation totals are not counts of held-out rows: {} examples, {} correct, loss sum {}",
                    e.examples, e.correct, e.loss_sum
                )));
            }
            let bins = medfl_shared::metrics::SCORE_BINS;
            let per_class: Vec<u64> = e
                .score_bins
                .chunks(bins * 2)
                .map(|c| c.iter().fold(0u64, |a, b| a.saturating_add(*b)))
                .collect();
            if !e.score_bins.len().is_multiple_of(bins * 2) || per_class.iter().any(|n| *n != e.examples) {
                return Err(Status::invalid_argument(format!(
                    "evaluation score bins are not {bins} bins of positives and of negatives per class, each class counting the {} held-out rows",
                    e.examples
                )));
            }
            Some(EvalCounts {
                examples: e.examples,
                correct: e.correct,
                loss_sum: e.loss_sum,
                score_bins: e.score_bins,
                noised: None,
            })
        }
    };
    Ok(UploadHeader {
        num_params: header.num_params,
        tensors: header
            .tensors
            .into_iter()
            .map(|t| TensorSpec {
                name: t.name,
                shape: t.shape,
            })
            .collect(),
        meta: UpdateMeta {
            update_id: header.update_id.clone(),
            examples: header.num_examples,
            train_loss: header.train_loss,
            evaluation,
        },
        update_id: header.update_id,
    })
}

impl SiteService {
    /// Counts a received update of `values` values for `/metrics`.
    pub(super) fn count_update(&self, values: u64) {
        let c = &self.engine.counters;
        crate::counters::Counters::add(&c.updates_received, 1);
        crate::counters::Counters::add(&c.update_bytes_received, values * 4);
    }

    #[instrument(skip_all, fields(site))]
    pub(super) async fn receive_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        let site = caller(&request)?.name.to_string();
        tracing::Span::current().record("site", site.as_str());
        let mut stream = request.into_inner();
        let header = match next_message(&mut stream, None).await? {
            Some(pb::UpdateChunk {
                body: Some(pb::update_chunk::Body::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "an update stream must start with an UpdateHeader",
                ));
            }
        };
        check_text("update_id", &header.update_id)?;
        if header.train_loss.is_some_and(|l| !l.is_finite()) {
            return Err(Status::invalid_argument("train_loss must be finite"));
        }
        let open = self.engine.open_round(&header.study_id, header.round)?;
        if !open.is_selected(&site) {
            return Err(Status::permission_denied(format!(
                "site {site} was not selected for round {} of study {}",
                header.round, header.study_id
            )));
        }
        if !header.secagg_session_id.is_empty() || open.secure.is_some() {
            return self.upload_masked(&site, &open, &header, stream).await;
        }
        let (update_id, num_params) = (header.update_id.clone(), header.num_params);
        let mut upload = match self.engine.begin_upload(open, &site, upload_header(header)?).await? {
            Admission::Receive(upload) => upload,
            Admission::AlreadyFolded { update_id } => {
                return Ok(Response::new(pb::UploadReceipt {
                    update_id,
                    values_received: num_params,
                }));
            }
        };
        let deadline = Some(upload.deadline().into());
        while let Some(msg) = next_message(&mut stream, deadline).await? {
            match msg.body {
                Some(pb::update_chunk::Body::Data(chunk)) => upload.accept(chunk.seq, chunk.offset, chunk.values)?,
                _ => {
                    return Err(Status::invalid_argument(
                        "only DataChunk messages may follow the UpdateHeader",
                    ));
                }
            }
        }
        let values = upload.finish().await?;
        self.count_update(values);
        Ok(Response::new(pb::UploadReceipt {
            update_id,
            values_received: values,
        }))
    }

    /// A masked input of secure aggregation: u32 words, summed mod 2^32 into the
    /// session as a whole once every chunk arrived.
    async fn upload_masked(
        &self,
        site: &str,
        open: &Arc<crate::engine::OpenRound>,
        header: &pb::UpdateHeader,
        mut stream: Streaming<pb::UpdateChunk>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        let sec = open.secure.clone().ok_or_else(|| {
            Status::failed_precondition("this round does not run secure aggregation: send the update unmasked")
        })?;
        if header.secagg_session_id.is_empty() {
            return Err(Status::failed_precondition(
                "this round runs secure aggregation: the update must be a masked input (secagg_session_id)",
            ));
        }
        sec.check_session(&header.secagg_session_id)?;
        sec.check_masked(site)?;
        let want = open.manifest.num_params();
        if header.num_params != want {
            return Err(Status::invalid_argument(format!(
                "masked input of {} values, the model has {want}",
                header.num_params
            )));
        }
        let mut values = vec![0u32; want as usize];
        let mut cursor = ChunkCursor::new(want);
        while let Some(msg) = next_message(&mut stream, Some(open.deadline().into())).await? {
            match msg.body {
                Some(pb::update_chunk::Body::Data(chunk)) => cursor
                    .decode_u32_into(chunk.seq, chunk.offset, &chunk.values, &mut values)
                    .map_err(ServiceError::from)?,
                _ => {
                    return Err(Status::invalid_argument(
                        "only DataChunk messages may follow the UpdateHeader",
                    ));
                }
            }
        }
        cursor.finish().map_err(ServiceError::from)?;
        let (for_sum, who) = (sec.clone(), site.to_string());
        tokio::task::spawn_blocking(move || for_sum.add_masked(&who, &values))
            .await
            .map_err(|e| Status::internal(format!("masked-sum task failed: {e}")))??;
        open.notify_progress();
        self.engine.touch(site);
        self.count_update(want);
        Ok(Response::new(pb::UploadReceipt {
            update_id: header.update_id.clone(),
            values_received: want,
        }))
    }
}
