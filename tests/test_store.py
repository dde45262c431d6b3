"""The image store on the gateway's embedded SecantusDB: claims, stages, READY records, conflicts."""

from __future__ import annotations

import re
import threading
import time
import uuid

import pymongo
import pytest

from imagegw.access import PUBLIC, Access
from imagegw.config import DEFAULT_STALE_PULL_TIMEOUT
from imagegw.errors import TRANSIENT_ERRORS, ConfigError, IndexUnavailable, PullTakenOver, RecordConflict
from imagegw.registry import Credential
from imagegw.registry.keychain import REQUEST, HandedCredential
from imagegw.store import ImageFacts, ImageStore, PullKey, PullTracker, Status, to_response
from imagegw.store.mongo import mongo_errors
from imagegw.store.sealing import sealer_for

KEY = PullKey("mycluster", "docker", "team/app:1")


@pytest.fixture
def database(mongo_uri: str):
    return pymongo.MongoClient(mongo_uri)[f"t_{uuid.uuid4().hex[:10]}"]


@pytest.fixture
def store(database, tmp_path) -> ImageStore:
    store = ImageStore(database, expiration_timeout=3600, sealer=sealer_for(tmp_path / "seal.key"))
    store.ensure_indexes()
    return store


def facts(image_id: str) -> ImageFacts:
    return ImageFacts(id=image_id, manifest_digest="sha256:" + image_id, registry="r:5000", repository="team/app",
                      arch="amd64", os="linux", size=4096, layers=["sha256:aa"], env=["PATH=/bin"],
                      entry=["/run"], cmd=None, workdir="/", labels={"a": "b"})


def new_claim(store: ImageStore) -> str:
    """The claim of a new pull of KEY: the ``pull_id`` its run writes under."""
    claim = store.claim(KEY)
    assert claim.claimed
    return str(claim.record["pull_id"])


def test_a_pull_moves_through_its_stages_and_lookups_see_only_ready_images(store: ImageStore) -> None:
    record, claimed = store.claim_pull(KEY)
    assert claimed and record["status"] == "INIT"
    pull_id = record["pull_id"]
    assert store.mark_queued(KEY, pull_id, "run-1")["status"] == "PENDING"
    store.set_stage(KEY, pull_id, Status.CONVERSION, "Building squashfs")

    assert store.pull_record(KEY)["status"] == "CONVERSION"
    assert store.lookup(KEY) is None

    store.publish(KEY, facts("1" * 64), pull_id=pull_id)

    assert store.lookup(KEY)["id"] == "1" * 64
    assert store.pull_record(KEY)["status"] == "READY"


def test_a_lookup_answers_what_the_tag_names_now_whoever_moved_or_expired_it(store: ImageStore, database,
                                                                            tmp_path) -> None:
    """A store remembers where it found a tag; another process (here, another store) moving the tag or
    expiring its image must show in the very next lookup."""
    elsewhere = ImageStore(database, expiration_timeout=3600, sealer=sealer_for(tmp_path / "seal.key"))
    store.publish(KEY, facts("1" * 64))
    assert store.lookup(KEY)["id"] == "1" * 64

    elsewhere.publish(KEY, facts("2" * 64))
    assert store.lookup(KEY)["id"] == "2" * 64
    assert store.lookup(KEY)["id"] == "2" * 64

    elsewhere.set_image_status(KEY.system, "2" * 64, Status.EXPIRED, "Expired")
    assert store.lookup(KEY) is None
    other_type = PullKey(KEY.system, "custom", KEY.tag)
    assert store.lookup(other_type) is None


def test_concurrent_claims_of_one_tag_give_exactly_one_winner(store: ImageStore) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(12)

    def claim() -> None:
        barrier.wait()
        results.append(store.claim_pull(KEY)[1])

    threads = [threading.Thread(target=claim) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(results) == [False] * 11 + [True]


def test_a_finished_or_failed_pull_can_be_claimed_again(store: ImageStore) -> None:
    pull_id = new_claim(store)
    assert store.claim_pull(KEY)[1] is False

    store.fail_pull(KEY, pull_id, "manifest unknown: r:5000/team/app:1")

    assert store.claim_pull(KEY)[1] is True


def test_a_pull_that_went_ready_after_the_callers_lookup_is_not_started_again(store: ImageStore, database) -> None:
    pull_id = new_claim(store)
    looked_up_at = time.time()  # the caller found no image: the pull was running
    store.publish(KEY, facts("a" * 64), pull_id=pull_id)

    late = store.claim(KEY, looked_up_at=looked_up_at)
    assert not late.claimed
    assert (late.record["status"], late.record["id"]) == ("READY", "a" * 64)
    # A caller that looked the image up after it was READY, and still wants it pulled (not fresh, or not theirs), may.
    assert store.claim(KEY, looked_up_at=time.time()).claimed


def test_a_ready_pull_recorded_without_a_heartbeat_can_be_pulled_again(store: ImageStore, database) -> None:
    store.publish(KEY, facts("b" * 64), pull_id=new_claim(store))
    database["pulls"].update_one(KEY.query(), {"$unset": {"heartbeat": ""}})  # as an older gateway left it

    assert store.claim(KEY, looked_up_at=time.time()).claimed


def test_a_pull_whose_run_went_silent_is_stale_and_can_be_claimed(store: ImageStore, database) -> None:
    store.set_stage(KEY, new_claim(store), Status.PULLING, "Pulling layers")
    database["pulls"].update_one(KEY.query(), {"$set": {"heartbeat": time.time() - DEFAULT_STALE_PULL_TIMEOUT - 1}})

    assert store.claim_pull(KEY)[1] is True


def test_only_a_running_pull_silent_past_the_stale_timeout_is_told_dead_to_its_own_run(store: ImageStore,
                                                                                        database) -> None:
    pull_id = new_claim(store)
    silent = {"heartbeat": time.time() - DEFAULT_STALE_PULL_TIMEOUT - 5}
    database["pulls"].update_one(KEY.query(), {"$set": silent})
    assert store.silence_of_dead_pull(KEY, pull_id) is None  # queued: waiting for a worker is no death
    store.set_stage(KEY, pull_id, Status.PULLING, "Pulling layers")
    assert store.silence_of_dead_pull(KEY, pull_id) is None  # beating
    database["pulls"].update_one(KEY.query(), {"$set": silent})
    assert DEFAULT_STALE_PULL_TIMEOUT + 5 <= (store.silence_of_dead_pull(KEY, pull_id) or 0) < \
        DEFAULT_STALE_PULL_TIMEOUT + 60
    assert store.silence_of_dead_pull(KEY, "another-claim") is None
    database["pulls"].update_one(KEY.query(), {"$unset": {"heartbeat": ""}})
    assert store.silence_of_dead_pull(KEY, pull_id) is None, "no heartbeat: not claimable, so not dead either"
    assert store.silence_of_dead_pull(PullKey("mycluster", "docker", "team/never:1"), pull_id) is None


def test_the_stale_timeout_is_the_stores_and_sets_the_heartbeat(database) -> None:
    store = ImageStore(database, expiration_timeout=3600, stale_pull_timeout=12)
    store.ensure_indexes()
    store.set_stage(KEY, new_claim(store), Status.PULLING, "Pulling layers: 0/1 done, 4.2 of 12.6 MB")

    assert store.heartbeat_interval == 2
    database["pulls"].update_one(KEY.query(), {"$set": {"heartbeat": time.time() - 3}})
    record, claimed = store.claim_pull(KEY)
    assert not claimed and record["status_message"] == "Pulling layers: 0/1 done, 4.2 of 12.6 MB"

    # Two beats missed: a poller is told the run may have died, and when a request will start the pull again.
    database["pulls"].update_one(KEY.query(), {"$set": {"heartbeat": time.time() - 5}})
    record, claimed = store.claim_pull(KEY)
    assert not claimed and record["status"] == "PULLING"
    assert record["status_message"].startswith("Pulling layers: 0/1 done, 4.2 of 12.6 MB (no heartbeat from its run "
                                               "for 5 s: it may have died; a request after 7 s more")

    database["pulls"].update_one(KEY.query(), {"$set": {"heartbeat": time.time() - 13}})
    record, claimed = store.claim_pull(KEY)
    assert claimed and record["status"] == "INIT"


def test_a_running_pull_beats_its_record(database) -> None:
    store = ImageStore(database, expiration_timeout=3600, stale_pull_timeout=6)
    store.ensure_indexes()
    pull_id = new_claim(store)
    database["pulls"].update_one(KEY.query(), {"$set": {"heartbeat": 0}})

    with PullTracker(store, KEY, pull_id).running():
        time.sleep(2.5)

    assert time.time() - store.pull_record(KEY)["heartbeat"] < 2.5


TAKEN_OVER = re.escape(f"the pull of team/app:1 for mycluster was taken over by another run after its record went "
                       f"{DEFAULT_STALE_PULL_TIMEOUT} s (StalePullTimeout) or more without a heartbeat from this one: "
                       "this run stops, publishing nothing")


def taken_over_from(store: ImageStore, database, dead_run: str) -> str:
    """The heartbeat of KEY's running pull stopped StalePullTimeout ago, and a request took it over; its claim."""
    database["pulls"].update_one(KEY.query(), {"$set": {"heartbeat": time.time() - DEFAULT_STALE_PULL_TIMEOUT - 1}})
    claim = store.claim(KEY)
    assert claim.claimed and claim.taken_over is not None
    assert claim.taken_over.flow_run_id == dead_run
    assert claim.taken_over.silent_for == pytest.approx(DEFAULT_STALE_PULL_TIMEOUT + 1, abs=1)
    return str(claim.record["pull_id"])


def test_a_run_whose_pull_was_taken_over_writes_nothing_over_the_new_claim(store: ImageStore, database) -> None:
    old = new_claim(store)
    store.mark_queued(KEY, old, "run-old")
    store.set_stage(KEY, old, Status.PULLING, "Pulling layers: 0/1 done, 4.2 of 12.6 MB")
    new = taken_over_from(store, database, "run-old")
    store.mark_queued(KEY, new, "run-new")
    queued = store.pull_record(KEY)

    # The old run, alive after all (its database cut off for longer than StalePullTimeout), comes back.
    with pytest.raises(PullTakenOver, match=TAKEN_OVER):
        store.set_stage(KEY, old, Status.CONVERSION, "All layers in; finishing the squashfs")
    with pytest.raises(PullTakenOver, match=TAKEN_OVER):
        store.beat(KEY, old)
    with pytest.raises(PullTakenOver, match=TAKEN_OVER):
        store.fail_pull(KEY, old, "squashfs verification failed")
    with pytest.raises(PullTakenOver, match=TAKEN_OVER):
        store.publish(KEY, facts("6" * 64), pull_id=old)

    assert store.pull_record(KEY) == queued
    assert (queued["status"], queued["pull_id"], queued["flow_run_id"]) == ("PENDING", new, "run-new")
    assert store.lookup(KEY) is None and database["images"].count_documents({}) == 0
    # The new run's writes go through.
    store.set_stage(KEY, new, Status.PULLING, "Pulling 1 layers (1 cached)")
    store.publish(KEY, facts("7" * 64), pull_id=new)
    assert store.lookup(KEY)["id"] == "7" * 64 and store.pull_record(KEY)["status"] == "READY"


def test_a_taken_over_runs_tracker_stops_it_without_recording_its_failure(store: ImageStore, database) -> None:
    tracker = PullTracker(store, KEY, new_claim(store))
    store.mark_queued(KEY, tracker.pull_id, "run-old")
    tracker.stage(Status.PULLING, "Pulling layers: 0/1 done, 4.2 of 12.6 MB")
    new = taken_over_from(store, database, "run-old")

    with pytest.raises(PullTakenOver, match=TAKEN_OVER), tracker.running():
        tracker.stage(Status.PULLING, "Pulling layers: 0/1 done, 8.4 of 12.6 MB")
    with pytest.raises(PullTakenOver, match=TAKEN_OVER):
        tracker.publish(facts("6" * 64), PUBLIC)
    with pytest.raises(KeyboardInterrupt), tracker.running():  # stopped meanwhile: its own end, unrecorded
        raise KeyboardInterrupt

    record = store.pull_record(KEY)
    assert (record["status"], record["status_message"], record["pull_id"]) == ("INIT", "Pull requested", new)
    assert "flow_run_id" not in record and store.lookup(KEY) is None


def test_only_a_running_pull_taken_over_names_a_run_to_end(store: ImageStore, database) -> None:
    first = store.claim(KEY)
    assert first.claimed and first.taken_over is None  # never pulled
    store.mark_queued(KEY, str(first.record["pull_id"]), "run-1")
    store.fail_pull(KEY, str(first.record["pull_id"]), "manifest unknown")
    again = store.claim(KEY)
    assert again.claimed and again.taken_over is None  # a failed run ended on its own

    store.mark_queued(KEY, str(again.record["pull_id"]), "run-2")
    database["pulls"].update_one(KEY.query(), {"$set": {"heartbeat": time.time() - 3601}})
    assert store.claim(KEY).taken_over is None  # queued, never started: nothing holds a slot


def test_a_run_started_before_it_was_marked_queued_is_still_known_by_its_id(store: ImageStore) -> None:
    pull_id = new_claim(store)
    store.set_stage(KEY, pull_id, Status.PULLING, "Getting manifest of r:5000/team/app:1")  # a quick worker

    record = store.mark_queued(KEY, pull_id, "run-1")

    assert (record["status"], record["flow_run_id"]) == ("PULLING", "run-1")


def test_a_run_started_without_a_claim_joins_the_records_or_files_one(store: ImageStore) -> None:
    filed = store.claim_for_run(KEY)  # an operator's run from the Prefect UI, for a tag never pulled
    assert (store.pull_record(KEY)["status"], store.pull_record(KEY)["pull_id"]) == ("INIT", filed)
    assert store.claim_for_run(KEY) == filed

    store.fail_pull(KEY, filed, "manifest unknown")
    pull_id = new_claim(store)  # imagegw pull claims the pull, then runs it without passing the claim on
    assert store.claim_for_run(KEY) == pull_id

    imported = PullKey("mycluster", "custom", "mine:1")
    store.publish(imported, facts("8" * 64))  # an import's record: no claim
    joined = store.claim_for_run(imported)
    assert store.pull_record(imported)["pull_id"] == joined and store.pull_record(imported)["status"] == "READY"


def test_failure_keeps_the_message(store: ImageStore) -> None:
    store.fail_pull(KEY, new_claim(store), "manifest unknown: r:5000/team/app:1")

    assert store.pull_record(KEY)["status_message"] == "manifest unknown: r:5000/team/app:1"


def test_response_has_shifter_fields_and_missing_ones_say_missing(store: ImageStore) -> None:
    store.claim_pull(KEY)

    response = to_response(store.pull_record(KEY))

    assert response["id"] == "MISSING" and response["status"] == "INIT"
    assert response["tag"] == ["team/app:1"] and response["ENV"] == "MISSING"
    assert "_id" not in response and "pull_id" not in response


def test_expiration_is_set_on_publish_and_renewed(store: ImageStore) -> None:
    record = store.publish(KEY, facts("2" * 64))
    assert record["expiration"] == pytest.approx(record["last_pull"] + 3600)

    store.renew("mycluster", "2" * 64)

    assert store.lookup(KEY)["expiration"] >= record["expiration"]


LOGIN = HandedCredential(Credential("the request", username="alice", password="s3:cr:et"), REQUEST)


def test_a_stored_login_is_handed_out_once(store: ImageStore) -> None:
    store.store_login(KEY, LOGIN)

    assert store.take_login(KEY) == LOGIN
    assert store.take_login(KEY) is None


def test_a_stored_login_is_sealed(store: ImageStore, database, tmp_path) -> None:
    store.store_login(KEY, LOGIN)

    stored = database["pull_logins"].find_one()
    assert b"s3:cr:et" not in repr(stored).encode() and b"alice" not in repr(stored).encode()
    key_file = tmp_path / "seal.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    other = ImageStore(database, expiration_timeout=3600, sealer=sealer_for(tmp_path / "other.key"))
    with pytest.raises(ConfigError, match="sealed with another key: the API and the workers must share one"):
        other.take_login(KEY)


def test_public_images_stay_public_and_private_pulls_share_acls(store: ImageStore) -> None:
    alice = Access(True, (1000,), (100,))
    bob = Access(True, (2000,), (200,))
    image = "3" * 64

    assert store.settle_access("mycluster", image, alice) == alice
    store.publish(KEY, facts(image), alice)
    assert store.settle_access("mycluster", image, bob) == Access(True, (1000, 2000), (100, 200))
    assert store.settle_access("mycluster", image, PUBLIC) == PUBLIC

    store.publish(KEY, facts(image), PUBLIC)

    assert store.settle_access("mycluster", image, bob) == PUBLIC


def test_a_recent_failure_is_held_so_pollers_see_it(store: ImageStore, database) -> None:
    store.fail_pull(KEY, new_claim(store), "manifest unknown")

    record, claimed = store.claim_pull(KEY, retry_failures_after=300)
    assert not claimed and record["status"] == "FAILURE"

    database["pulls"].update_one(KEY.query(), {"$set": {"heartbeat": time.time() - 301}})
    assert store.claim_pull(KEY, retry_failures_after=300)[1] is True


def test_a_duplicate_record_is_a_conflict_that_is_not_retried(store: ImageStore, database) -> None:
    store.publish(KEY, facts("5" * 64), PUBLIC)
    record = database["images"].find_one({"id": "5" * 64}, {"_id": False})

    with pytest.raises(RecordConflict, match="refused a duplicate record") as caught:
        with mongo_errors():
            database["images"].insert_one(record)  # the same (system, id) again: the unique index refuses

    assert not isinstance(caught.value, TRANSIENT_ERRORS)


def test_an_unreachable_server_is_an_outage_worth_retrying() -> None:
    unreachable = pymongo.MongoClient("mongodb://127.0.0.1:9", serverSelectionTimeoutMS=200)

    with pytest.raises(IndexUnavailable, match="unavailable") as caught:
        ImageStore(unreachable["x"], 3600).pull_record(KEY)

    assert isinstance(caught.value, TRANSIENT_ERRORS)


def test_a_pull_stopped_from_outside_is_recorded_as_failure_at_once(store: ImageStore) -> None:
    pull_id = new_claim(store)

    with pytest.raises(KeyboardInterrupt):  # as a cancelled run's SIGTERM or a Ctrl-C arrives
        with PullTracker(store, KEY, pull_id).running():
            raise KeyboardInterrupt

    record = store.pull_record(KEY)
    assert record["status"] == "FAILURE" and record["status_message"].startswith("cancelled by an operator")


def test_a_late_progress_report_does_not_undo_a_recorded_failure(store: ImageStore) -> None:
    tracker = PullTracker(store, KEY, new_claim(store))

    with pytest.raises(KeyboardInterrupt), tracker.running():
        raise KeyboardInterrupt
    tracker.stage(Status.PULLING, "Pulling layers: 0/1 done, 4.2 of 12.6 MB")  # a download thread, too late

    assert store.pull_record(KEY)["status"] == "FAILURE"


def test_a_pull_failing_while_the_database_is_away_records_its_failure_once_it_is_back(tmp_path) -> None:
    from testsupport.secantus import RunningSecantus

    with RunningSecantus.start(tmp_path / "mongo") as server:
        client = pymongo.MongoClient(server.uri, serverSelectionTimeoutMS=1000)
        store = ImageStore(client["gateway"], expiration_timeout=3600)
        store.ensure_indexes()
        tracker = PullTracker(store, KEY, new_claim(store))
        tracker.stage(Status.PULLING, "Pulling layers: 0/1 done")
        server.interrupt()
        back = threading.Timer(3.0, server.resume)
        back.start()
        try:
            with pytest.raises(RuntimeError, match="registry went away"), tracker.running():
                raise RuntimeError("registry went away")
        finally:
            back.join()
        record = store.pull_record(KEY)
    assert (record["status"], record["status_message"]) == ("FAILURE", "registry went away")
