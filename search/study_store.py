"""Optuna's storage for search.run: an RDB storage whose pop of enqueued trials is safe between
workers, heartbeats that settle the trials of killed workers, and table creation that survives
several commands starting together on one new database."""
from __future__ import annotations

import time

import optuna
from optuna.trial import TrialState

from search.study import StudyConfig


class QueueSafeRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose WAITING -> RUNNING step, the pop of an enqueued trial (baselines,
    retries of stale trials), is one conditional UPDATE. Optuna reads the state, then writes it;
    SQLite takes no lock for the read (no SELECT ... FOR UPDATE), so workers popping together
    both got one trial, both trained it, and the second one's tell crashed its worker ('Cannot
    tell a COMPLETE trial'). tests/test_concurrency.py pops with 6 processes.

    A trial that becomes RUNNING (popped, or asked anew) gets its first heartbeat at once, from
    the database's clock: in the pop's own transaction, right after the creation of a new one.
    Optuna's first beat came from the heartbeat thread later (seconds later when SQLite's write
    lock was busy), and a worker killed in between left a RUNNING trial without a heartbeat,
    which Optuna never counts as stale: it stayed RUNNING for good (tests/test_crash.py, once in
    five CI runs)."""

    def _create_new_trial(self, study_id, template_trial=None):
        frozen = super()._create_new_trial(study_id, template_trial)
        if self.heartbeat_interval and frozen.state == TrialState.RUNNING:
            self.record_heartbeat(frozen._trial_id)
        return frozen

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        if state != TrialState.RUNNING or values is not None:
            return super().set_trial_state_values(trial_id, state, values)
        from datetime import datetime

        from optuna.storages._rdb import models
        trials = models.TrialModel
        session = self.scoped_session()
        try:
            n = session.query(trials).filter(trials.trial_id == trial_id,
                                             trials.state == TrialState.WAITING) \
                .update({trials.state: TrialState.RUNNING}, synchronize_session=False)
            if n == 1:   # this transaction holds the write lock: the rest is ours alone
                trials.find_or_raise_by_id(trial_id, session).datetime_start = datetime.now()
                beat = models.TrialHeartbeatModel
                if self.heartbeat_interval and beat.where_trial_id(trial_id, session) is None:
                    session.add(beat(trial_id=trial_id))   # heartbeat: the database's now
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
        if n == 1:
            return True
        # not waiting any more: Optuna's answer (False while running, an UpdateFinishedTrialError
        # once finished), which its pop expects
        return super().set_trial_state_values(trial_id, state, values)

    def heartbeats(self, study_id: int) -> dict:
        """trial id -> last heartbeat (the database's clock) of the study's running trials; None
        for one that has not beaten yet."""
        from optuna.storages._rdb import models
        session = self.scoped_session()
        try:
            rows = session.query(models.TrialModel.trial_id, models.TrialHeartbeatModel.heartbeat) \
                .outerjoin(models.TrialHeartbeatModel,
                           models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id) \
                .filter(models.TrialModel.study_id == study_id,
                        models.TrialModel.state == TrialState.RUNNING).all()
            return dict(rows)
        finally:
            session.close()

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials, and the running ones without a heartbeat that started longer
        than the grace period ago: a worker killed between a trial's creation and its first
        beat (see the class). Optuna skips those for good. Their start is the asking worker's
        clock, compared here as seconds since the epoch (a naive local time's timestamp: right
        across daylight saving)."""
        from optuna.storages._rdb import models
        stale = super()._get_stale_trial_ids(study_id)
        grace = self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval
        trial, beat = models.TrialModel, models.TrialHeartbeatModel
        session = self.scoped_session()
        try:
            # the models' datetime_start is local time (Optuna 5 stores UTC behind a property)
            starts = {t.trial_id: t.datetime_start for t in session.query(trial)
                      .outerjoin(beat, beat.trial_id == trial.trial_id)
                      .filter(trial.study_id == study_id, trial.state == TrialState.RUNNING,
                              beat.trial_id.is_(None)).all()}
        finally:
            session.close()
        now = time.time()
        return stale + [t for t, start in starts.items()
                        if start is not None and now - start.timestamp() > grace]


def settle_dead_trials(study) -> None:
    """Fail the running trials of workers that died. Optuna fails a stale trial only when a
    worker begins its next trial, so a command re-run right after a `kill -9` whose budget was
    then spent (a running trial's wall time counts in it) ended with the killed trial still
    RUNNING, for good. This watches the running trials' heartbeats: one that beats again belongs
    to a live worker and is left to it; a silent one is waited for until its grace period ends,
    then failed (and re-enqueued by the retry callback)."""
    storage = getattr(study._storage, "_backend", study._storage)   # under Optuna's cache
    if not isinstance(storage, QueueSafeRDBStorage) or not storage.heartbeat_interval:
        return
    first = storage.heartbeats(study._study_id)
    # + 1 s: SQLite's clock counts whole seconds, so a beat may only show a second later
    deadline = time.monotonic() + storage.grace_period + storage.heartbeat_interval + 1
    while True:
        optuna.storages.fail_stale_trials(study)
        silent = [t for t, beat in storage.heartbeats(study._study_id).items()
                  if t in first and first[t] == beat]   # None == None: killed before its first beat
        if not silent or time.monotonic() > deadline:
            return
        time.sleep(0.5)


def storage(cfg: StudyConfig):
    import optuna.storages as st
    kw = {"connect_args": {"timeout": 60}} if cfg.storage.startswith("sqlite") else {"pool_pre_ping": True}
    if hasattr(st, "RetryHeartbeatStaleTrialCallback"):   # Optuna >= 4.9 renamed it (old name warns)
        retry = {"heartbeat_stale_trial_callback": st.RetryHeartbeatStaleTrialCallback(max_retry=1)}
    else:
        retry = {"failed_trial_callback": st.RetryFailedTrialCallback(max_retry=1)}
    return _created_once(lambda: QueueSafeRDBStorage(cfg.storage, engine_kwargs=kw,
                                               heartbeat_interval=cfg.heartbeat_s,
                                               grace_period=3 * cfg.heartbeat_s, **retry))


def _created_once(make, attempts: int = 6):
    """Optuna creates its tables on first use. Commands started together against one new
    PostgreSQL database race there: both see no `studydirection` type, both `CREATE TYPE`, and
    the loser's transaction fails with a unique violation (a table or the version row likewise).
    The winner's schema is complete once its transaction commits, so the loser tries again."""
    import random
    import time

    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
    for attempt in range(attempts):
        try:
            return make()
        except (IntegrityError, ProgrammingError, OperationalError) as e:
            racing = any(w in str(e).lower() for w in ("already exists", "duplicate", "unique"))
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
