//! Hostile and malformed input, one test each, against a real coordinator over mTLS:
//! each is refused with the right status and a message a person can act on, nothing is
//! folded or stored, and the coordinator keeps serving (the site then delivers a good
//! update that commits). `refusals.rs` holds the foundation's cases (wrong shape,
//! NaN/Inf, out-of-order and truncated streams, a second update, a site not selected,
//! a closed round).

use std::time::Duration;

use crate::common::*;
use bytes::BufMut;
use medfl::Federation;
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Four parameters; hospital-b is selected too and never delivers, so the round stays
/// open until its deadline.
struct Scene {
    fed: Federation,
    site: SiteClient<Channel>,
    work: pb::WorkItem,
    id: String,
}

async fn scene(deadline_secs: u64) -> Scene {
    let features = feature_names(3);
    let mut fed = Federation::builder().sites(2).build().await.expect("federation starts");
    let mut site = fed.site_client("hospital-a").expect("client");
    register(&mut site, &features).await.expect("register");
    let mut idle = fed.site_client("hospital-b").expect("client");
    register(&mut idle, &features).await.expect("register");
    let id = fed
        .create_study(&manifest(&features, 2, 1, deadline_secs, 1))
        .await
        .expect("create");
    fed.start_study(&id).await.expect("start");
    let work = next_work(&mut site, Duration::from_secs(20)).await.expect("work");
    Scene { fed, site, work, id }
}

impl Scene {
    /// The refusal has `code` and says `needle`; nothing was received or committed and
    /// the coordinator still serves.
    async fn refused<T: std::fmt::Debug>(&mut self, result: Result<T, Status>, code: Code, needle: &str) {
        let err = result.expect_err("hostile input must be refused");
        assert_eq!(err.code(), code, "{err:?}");
        assert!(
            err.message().contains(needle),
            "wanted {needle:?} in {:?}",
            err.message()
        );
        let status = self.fed.status(&self.id).await.expect("the coordinator keeps serving");
        let info = status.info.clone().expect("info");
        assert_eq!(info.rounds_completed, 0, "nothing committed");
        if let Some(open) = &status.open_round {
            assert!(open.received.is_empty(), "nothing folded: {:?}", open.received);
        }
    }

    /// A good update still goes through.
    async fn still_accepts_a_good_update(mut self) {
        upload(&mut self.site, &self.work, "good", 10, &[0.5; 4])
            .await
            .expect("a good update after the hostile one");
        self.fed.shutdown().await.expect("clean shutdown");
    }
}

/// Sends `messages` (raw protobuf bytes each) as a client stream to `method`.
async fn raw_stream(channel: Channel, method: &str, messages: Vec<Vec<u8>>) -> Result<(), Status> {
    #[derive(Default)]
    struct Raw;
    struct RawEncoder;
    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = pb::Empty;
        type Encoder = RawEncoder;
        type Decoder = <medfl_proto::codec::StrictCodec<pb::Empty, pb::Empty> as Codec>::Decoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> Self::Decoder {
            medfl_proto::codec::StrictCodec::<pb::Empty, pb::Empty>::default().decoder()
        }
    }
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::try_from(method.to_string()).map_err(|e| Status::internal(e.to_string()))?;
    grpc.client_streaming(Request::new(futures::stream::iter(messages)), path, Raw)
        .await
        .map(|_| ())
}

fn data(seq: u64, offset: u64, bytes: Vec<u8>) -> pb::UpdateChunk {
    pb::UpdateChunk {
        body: Some(pb::update_chunk::Body::Data(pb::DataChunk {
            seq,
            offset,
            values: bytes.into(),
        })),
    }
}

fn f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

async fn send(s: &mut Scene, messages: Vec<pb::UpdateChunk>) -> Result<pb::UploadReceipt, Status> {
    Ok(s.site
        .upload_update(futures::stream::iter(messages))
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_is_invalid_argument() {
    let mut s = scene(30).await;
    let channel = s.fed.profile("hospital-a").expect("p").channel(None).expect("c");
    let r = raw_stream(
        channel,
        "/medfl.v1.Site/UploadUpdate",
        vec![vec![0xff, 0xff, 0xff, 0x0f]],
    )
    .await;
    s.refused(r, Code::InvalidArgument, "malformed protobuf").await;
    s.still_accepts_a_good_update().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_that_is_not_utf8_is_invalid_argument() {
    let mut s = scene(30).await;
    // UpdateChunk.header (field 1) holding UpdateHeader.study_id (field 1) = 0xff 0xfe.
    let header = [0x0a, 0x02, 0xff, 0xfe];
    let mut chunk = vec![0x0a, header.len() as u8];
    chunk.extend_from_slice(&header);
    let channel = s.fed.profile("hospital-a").expect("p").channel(None).expect("c");
    let r = raw_stream(channel, "/medfl.v1.Site/UploadUpdate", vec![chunk]).await;
    s.refused(r, Code::InvalidArgument, "malformed protobuf").await;
    s.still_accepts_a_good_update().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_metadata_is_invalid_argument() {
    let mut s = scene(30).await;
    let id = "x".repeat(10_000);
    let r = upload(&mut s.site, &s.work.clone(), &id, 10, &[0.5; 4]).await;
    s.refused(r, Code::InvalidArgument, "update_id is 10000 bytes").await;
    s.still_accepts_a_good_update().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_that_are_not_whole_f32s_are_invalid_argument() {
    let mut s = scene(30).await;
    let msgs = vec![header(&s.work, "dtype", 10, 4), data(0, 0, vec![0; 15])];
    let r = send(&mut s, msgs).await;
    s.refused(r, Code::InvalidArgument, "not a whole number of f32 values")
        .await;
    s.still_accepts_a_good_update().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_chunk_is_invalid_argument() {
    let mut s = scene(30).await;
    let msgs = vec![
        header(&s.work, "dup", 10, 4),
        data(0, 0, f32s(&[0.1, 0.2])),
        data(0, 0, f32s(&[0.1, 0.2])),
    ];
    let r = send(&mut s, msgs).await;
    s.refused(r, Code::InvalidArgument, "out of order").await;
    s.still_accepts_a_good_update().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_chunk_is_invalid_argument() {
    let mut s = scene(30).await;
    let msgs = vec![
        header(&s.work, "gap", 10, 4),
        data(0, 0, f32s(&[0.1, 0.2])),
        data(2, 2, f32s(&[0.3, 0.4])),
    ];
    let r = send(&mut s, msgs).await;
    s.refused(r, Code::InvalidArgument, "out of order").await;
    s.still_accepts_a_good_update().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_beyond_the_model_size_is_invalid_argument() {
    let mut s = scene(30).await;
    let msgs = vec![
        header(&s.work, "long", 10, 4),
        data(0, 0, f32s(&[0.1; 4])),
        data(1, 4, f32s(&[0.1; 4])),
    ];
    let r = send(&mut s, msgs).await;
    s.refused(r, Code::InvalidArgument, "runs past the end of the model")
        .await;
    s.still_accepts_a_good_update().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_before_it_is_decoded() {
    let mut s = scene(30).await;
    // One 5 MiB chunk: past the 4 MiB message limit.
    let msgs = vec![header(&s.work, "big", 10, 4), data(0, 0, vec![0; 5 << 20])];
    let r = send(&mut s, msgs).await;
    let code = r.as_ref().map_err(|e| e.code()).expect_err("oversized");
    assert!(matches!(code, Code::OutOfRange | Code::ResourceExhausted), "{r:?}");
    s.refused(r, code, "message length too large").await;
    s.still_accepts_a_good_update().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_for_a_future_round_is_failed_precondition() {
    let mut s = scene(30).await;
    let mut work = s.work.clone();
    work.round = 2;
    let r = upload(&mut s.site, &work, "future", 10, &[0.5; 4]).await;
    s.refused(r, Code::FailedPrecondition, "round 2 of study").await;
    s.still_accepts_a_good_update().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_for_another_studys_round_is_refused() {
    let mut s = scene(30).await;
    let other = s
        .fed
        .create_study(&manifest(&feature_names(3), 2, 1, 30, 1))
        .await
        .expect("create");
    let mut work = s.work.clone();
    work.study_id = other.clone();
    let r = upload(&mut s.site, &work, "other", 10, &[0.5; 4]).await;
    s.refused(r, Code::FailedPrecondition, "has no open round").await;
    let mut work = s.work.clone();
    work.study_id = "s-000000000000".into();
    let r = upload(&mut s.site, &work, "unknown", 10, &[0.5; 4]).await;
    s.refused(r, Code::NotFound, "no study").await;
    s.still_accepts_a_good_update().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_update_from_an_earlier_round_is_failed_precondition() {
    let mut s = scene(1).await;
    let first = s.work.clone();
    upload(&mut s.site, &first, "r1", 10, &[0.5; 4]).await.expect("round 1");
    s.fed
        .wait_for_round(&s.id, 1, Duration::from_secs(30))
        .await
        .expect("round 1 commits at its deadline");
    let r = upload(&mut s.site, &first, "r1", 10, &[0.5; 4]).await;
    let err = r.expect_err("replay");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("round 1 of study"), "{}", err.message());
    let status = s.fed.status(&s.id).await.expect("serving");
    assert_eq!(status.rounds.iter().filter(|r| r.committed && r.round == 1).count(), 1);
    s.fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_upload_is_cut_at_the_round_deadline() {
    let mut s = scene(3).await;
    // The header, then nothing: the sender stays open.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header(&s.work, "slow", 10, 4)).await.expect("header");
    let r = s
        .site
        .upload_update(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let err = r.expect_err("cut");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("deadline"), "{}", err.message());
    drop(tx);
    s.fed.status(&s.id).await.expect("the coordinator keeps serving");
    s.fed.shutdown().await.expect("clean shutdown");
}
