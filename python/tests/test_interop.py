"""Python grpcio against a real medfl coordinator, over mTLS.

The Rust test ``tests/it/interop.rs`` starts the federation, completes a study and
runs this module with the bundles in the environment:

- ``MEDFL_ADMIN``, ``MEDFL_AUDITOR``, ``MEDFL_SITE``: P-256 bundle directories;
- ``MEDFL_STUDY``: a completed study's id;
- ``MEDFL_ED25519_ADMIN`` (optional): an admin bundle of an Ed25519 consortium,
  whose coordinator is running, to show that gRPC core refuses Ed25519.

Run by hand the same way: ``MEDFL_ADMIN=... python -m unittest tests.test_interop``
from ``python/``.
"""

import os
import unittest

import grpc

import medfl
from medfl.v1 import medfl_pb2 as pb


def bundle(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise unittest.SkipTest(f"{name} is not set: run from tests/it/interop.rs")
    return value


class P256Bundles(unittest.TestCase):
    def test_health_check_passes_for_each_role(self):
        for name in ("MEDFL_ADMIN", "MEDFL_AUDITOR", "MEDFL_SITE"):
            with medfl.channel(bundle(name)) as ch:
                self.assertTrue(medfl.health_check(ch), name)

    def test_an_admin_lists_studies_and_reads_a_status(self):
        study = bundle("MEDFL_STUDY")
        with medfl.channel(bundle("MEDFL_ADMIN")) as ch:
            admin = medfl.admin(ch)
            ids = [s.study_id for s in admin.ListStudies(pb.Empty(), timeout=10).studies]
            self.assertIn(study, ids)
            status = admin.GetStudyStatus(pb.StudyRef(study_id=study), timeout=10)
            self.assertEqual(status.info.study_id, study)
            self.assertEqual(status.info.state, pb.STUDY_STATE_COMPLETED)
            self.assertEqual(status.info.rounds_completed, status.info.rounds_total)

    def test_an_auditor_reads_the_ledger(self):
        study = bundle("MEDFL_STUDY")
        with medfl.channel(bundle("MEDFL_AUDITOR")) as ch:
            audit = medfl.audit(ch)
            self.assertIn(study, [s.study_id for s in audit.ListStudies(pb.Empty(), timeout=10).studies])
            status = audit.GetStudyStatus(pb.StudyRef(study_id=study), timeout=10)
            ledger = audit.GetLedger(pb.LedgerRequest(study_id=study), timeout=10)
            self.assertGreater(len(ledger.charges), 0)
            self.assertGreaterEqual(len(ledger.charges), status.info.rounds_completed)
            for charge in ledger.charges:
                self.assertGreater(charge.epsilon_after, 0.0)
            print(f"ledger of {study}: {len(ledger.charges)} charges")

    def test_a_site_may_not_call_the_admin_service(self):
        with medfl.channel(bundle("MEDFL_SITE")) as ch:
            with self.assertRaises(grpc.RpcError) as caught:
                medfl.admin(ch).ListStudies(pb.Empty(), timeout=10)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.PERMISSION_DENIED)


class Ed25519Bundles(unittest.TestCase):
    def test_grpc_core_cannot_handshake_with_an_ed25519_key(self):
        with medfl.channel(bundle("MEDFL_ED25519_ADMIN")) as ch:
            with self.assertRaises(grpc.RpcError) as caught:
                medfl.admin(ch).ListStudies(pb.Empty(), timeout=10)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)
            print(f"ed25519: {caught.exception.details()}")


if __name__ == "__main__":
    unittest.main()
