//! Fuzzing the decoders and validators that face the network or a hospital's files,
//! with proptest (the toolchain here is stable, so no cargo-fuzz): arbitrary bytes, and
//! mutations (byte edits, cuts) of the seed corpus kept in `fuzz/corpus/<target>/`.
//! The property everywhere: a clear `Err`, never a panic, and what is accepted is
//! consistent. A failing case is saved by proptest under `tests/it/fuzz.proptest-regressions`
//! and replayed first from then on.
//!
//! `cargo test --test it -- --ignored fuzz::regenerate_corpus` rewrites the generated seeds.

use std::path::{Path, PathBuf};

use medfl_shared::chainlog::{self, Chain, Header, Signer};
use medfl_shared::chunk::{ChunkCursor, encode};
use medfl_shared::identity::{Identity, Role};
use medfl_shared::manifest::StudyManifest;
use proptest::prelude::*;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).expect("seed")).collect();
    assert!(!seeds.is_empty(), "fuzz/corpus/{target} is empty");
    seeds
}

/// A seed with up to eight byte edits and maybe cut short.
fn mutation(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus(target);
    let n = seeds.len();
    (
        0..n,
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        proptest::option::of(any::<prop::sample::Index>()),
    )
        .prop_map(move |(i, edits, cut)| {
            let mut bytes = seeds[i].clone();
            if bytes.is_empty() {
                return bytes;
            }
            for (at, b) in edits {
                let at = at.index(bytes.len());
                bytes[at] = b;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        })
}

fn check_manifest(text: &str) {
    if let Ok(m) = StudyManifest::from_toml(text) {
        // What is accepted validates and is content-addressed stably.
        m.validate().expect("an accepted manifest validates");
        let again = StudyManifest::from_toml(&m.to_toml()).expect("a manifest round-trips");
        assert_eq!(again.hash(), m.hash());
        let _ = m.privacy_plan();
    }
}

/// One `(seq, offset, bytes)` message of an update stream.
fn chunk_message() -> impl Strategy<Value = (u64, u64, Vec<u8>)> {
    (0u64..6, 0u64..40, proptest::collection::vec(any::<u8>(), 0..48))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn manifests_from_mutated_seeds(bytes in mutation("manifest")) {
        check_manifest(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn manifests_from_arbitrary_text(text in "\\PC{0,300}") {
        check_manifest(&text);
    }

    #[test]
    fn the_chunk_cursor_accepts_only_a_whole_ordered_finite_stream(
        total in 1u64..24,
        messages in proptest::collection::vec(chunk_message(), 0..8),
    ) {
        let mut cursor = ChunkCursor::new(total);
        let mut dest = vec![0f32; total as usize];
        let mut ok = true;
        for (seq, offset, bytes) in &messages {
            if cursor.decode_into(*seq, *offset, bytes, &mut dest).is_err() {
                ok = false;
                break;
            }
        }
        if ok && cursor.finish().is_ok() {
            // Accepted: the messages were exactly the model, in order, all finite.
            let concat: Vec<u8> = messages.iter().flat_map(|m| m.2.clone()).collect();
            prop_assert_eq!(concat.len() as u64, total * 4);
            prop_assert!(dest.iter().all(|v| v.is_finite()));
            prop_assert_eq!(encode(&dest), concat);
        }
    }

    #[test]
    fn chunk_streams_from_mutated_seeds(bytes in mutation("chunk")) {
        // Seeds are a u64 value count, then 4-byte little-endian f32 values.
        if bytes.len() >= 8 {
            let total = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")).min(1 << 16);
            let mut cursor = ChunkCursor::new(total.max(1));
            let mut dest = vec![0f32; total.max(1) as usize];
            let _ = cursor.decode_into(0, 0, &bytes[8..], &mut dest).and_then(|()| cursor.finish());
        }
    }

    #[test]
    fn audit_exports_from_mutated_seeds(bytes in mutation("chainlog")) {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(v) = chainlog::verify_export(&text, None, true) {
            // Whatever verifies is a whole, checkpointed log.
            prop_assert!(v.checkpointed);
        }
    }

    #[test]
    fn a_cut_export_never_verifies(cut in any::<prop::sample::Index>()) {
        let seed = corpus("chainlog").remove(0);
        let text = String::from_utf8(seed).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        let keep = cut.index(lines.len() - 1); // never the whole file
        let cut_text = lines[..keep].join("\n");
        prop_assert!(chainlog::verify_export(&cut_text, None, true).is_err());
    }

    #[test]
    fn certificates_and_csrs_from_mutated_seeds(bytes in mutation("x509")) {
        let _ = Identity::from_cert_der(&bytes);
        let _ = medfl_coordinator::governance::issued_secs(&bytes);
        let _ = medfl_shared::sign::verify_by_certificate(&bytes, "", b"m", &[0; 64]);
    }

    #[test]
    fn identity_uris_from_arbitrary_text(text in "\\PC{0,80}") {
        if let Ok(id) = Identity::from_uri(&text) {
            prop_assert_eq!(Identity::from_uri(&id.uri()).expect("round trip"), id);
        }
    }

    #[test]
    fn wire_messages_from_mutated_seeds(bytes in mutation("wire")) {
        use prost::Message;
        if let Ok(work) = medfl_proto::v1::WorkItem::decode(bytes.as_slice()) {
            check_manifest(&work.manifest_toml);
            if let Some(s) = &work.secagg {
                let params = medfl_proto::secagg::session_from_pb(&work, s);
                let _ = medfl_shared::secagg::check_rosters(&params, &[&params.roster]);
            }
        }
        let _ = medfl_proto::v1::UpdateChunk::decode(bytes.as_slice());
    }

    #[test]
    fn policy_dates_from_arbitrary_text(text in "\\PC{0,20}") {
        let _ = medfl_site_agent::policy::end_of_day_ms(&text);
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

/// Rewrites the generated seeds (the manifests are copied from deploy/examples).
#[test]
#[ignore = "run by hand to refresh fuzz/corpus"]
fn regenerate_corpus() {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    for name in ["manifest.toml", "manifest-site-dp.toml"] {
        write(
            &corpus_dir("manifest"),
            name,
            &std::fs::read(examples.join(name)).expect("example"),
        );
    }
    let mut chunk = 6u64.to_le_bytes().to_vec();
    chunk.extend(encode(&[0.5, -1.0, 2.0, 0.0, 1e-3, 3.5]));
    write(&corpus_dir("chunk"), "six-values.bin", &chunk);

    let signer =
        Signer::from_pkcs8(&Signer::generate_pkcs8(medfl_shared::sign::Algorithm::P256).expect("key")).expect("signer");
    let mut chain = Chain::default();
    let entries: Vec<_> = (0..4)
        .map(|i| {
            chain.append(
                &signer,
                1_764_000_000_000 + i,
                "admin/alice",
                "study.state",
                "s-1",
                &serde_json::json!({"state": "running", "i": i}),
            )
        })
        .collect();
    let header = Header {
        format: chainlog::FORMAT.into(),
        log: "audit".into(),
        keeper: "coordinator".into(),
        public_key: signer.public_key_hex(),
        algorithm: signer.algorithm(),
    };
    let export = chainlog::export_lines(&header, &entries, Some(&chain.checkpoint(&signer, 1_764_000_000_100)));
    write(&corpus_dir("chainlog"), "audit-export.jsonl", export.as_bytes());

    let dir = tempfile::tempdir().expect("tempdir");
    medfl_coordinator::pki::init(dir.path(), medfl_shared::sign::Algorithm::P256).expect("ca");
    let identity = Identity::new(Role::Site, "hospital-a".parse().expect("name"));
    let bundle = medfl_coordinator::pki::issue(
        dir.path(),
        &medfl_coordinator::pki::IssueRequest {
            identity: identity.clone(),
            dns: vec![],
            ips: vec![],
            days: 30,
            coordinator: None,
            algorithm: None,
        },
    )
    .expect("issue");
    let pem = std::fs::read(bundle.join("cert.pem")).expect("cert");
    let der: rustls::pki_types::CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(&pem).expect("pem");
    write(&corpus_dir("x509"), "site-cert.der", der.as_ref());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    write(
        &corpus_dir("x509"),
        "site-csr.der",
        &medfl_coordinator::pki::csr_for(&identity, &key).expect("csr"),
    );

    use prost::Message;
    let manifest = std::fs::read_to_string(examples.join("manifest.toml")).expect("manifest");
    let parsed = StudyManifest::from_toml(&manifest).expect("valid");
    let work = medfl_proto::v1::WorkItem {
        study_id: "s-1".into(),
        round: 3,
        manifest_hash: parsed.hash(),
        manifest_toml: manifest,
        deadline_unix_ms: 1_764_000_000_000,
        num_params: parsed.num_params(),
        secagg: Some(medfl_proto::v1::SecAggSession {
            session_id: vec![7; 32],
            roster: vec!["hospital-a".into(), "hospital-b".into(), "hospital-c".into()],
            threshold: 2,
            num_values: parsed.num_params(),
            scale_log2: 20,
            attempt: 1,
            neighbours: 0,
        }),
        settings: Some(medfl_proto::settings::settings_to_pb(&parsed.round_settings())),
        ..Default::default()
    };
    write(&corpus_dir("wire"), "work-item.pb", &work.encode_to_vec());
    let update = crate::common::header(&work, "u-1", 10, 4);
    write(&corpus_dir("wire"), "update-header.pb", &update.encode_to_vec());
}
