"""The thread governor: kernels run on the cores other processes leave free."""

import os

import pytest


class FakeMachine:
    """CPU seconds of every process on our CPUs and of ours, and a clock, set by hand."""

    def __init__(self):
        self.t = self.busy = self.own = 0.0
        self.g = None

    def run(self, seconds, ours, others):
        """`seconds` pass with this process on `ours` cores (computing, when ours > 0)
        and others on `others`."""
        self.t += seconds
        self.own += ours * seconds
        self.busy += (ours + others) * seconds
        if ours > 0 and self.g is not None:
            self.g.add_computed(seconds)

    def governor(self, cpus=2):
        from cnnspec.kernels.cpu.threads import ThreadGovernor

        self.g = ThreadGovernor(
            cpus=list(range(cpus)),
            busy=lambda: self.busy,
            own=lambda: self.own,
            clock=lambda: self.t,
        )
        return self.g


def test_governor_gives_a_busy_core_back_and_takes_it_again_when_free():
    m = FakeMachine()
    g = m.governor(cpus=2)
    assert g.threads(2) == 2  # nothing seen yet
    m.run(1.0, ours=2, others=0.1)
    assert g.threads(2) == 2  # a daemon's blip
    m.run(1.0, ours=1.3, others=0.7)  # a busy process beside us
    assert g.threads(2) == 1
    m.run(0.1, ours=1, others=1)
    assert g.threads(2) == 1  # no new look within the window
    m.run(1.0, ours=1, others=0)  # it stopped
    assert g.threads(2) == 2


def test_governor_ignores_what_others_do_while_the_model_waits():
    m = FakeMachine()
    g = m.governor(cpus=2)
    g.threads(2)
    m.run(0.2, ours=2, others=0)
    m.run(1.0, ours=0, others=2)  # idle: another framework's turn in a benchmark
    assert g.threads(2) == 2  # computed 0.2 s of 1.2: the window says nothing
    m.run(1.0, ours=1.2, others=0.8)  # computing beside a busy process
    assert g.threads(2) == 1
    m.run(2.0, ours=0, others=0)  # idle and quiet: the verdict stands
    assert g.threads(2) == 1
    m.run(1.0, ours=1, others=0)
    assert g.threads(2) == 2


def test_governor_keeps_the_users_setting_as_ceiling_and_leaves_room_for_many_cores():
    m = FakeMachine()
    g = m.governor(cpus=16)
    g.threads(16)
    m.run(1.0, ours=15, others=1.0)
    assert g.threads(16) == 15
    assert g.threads(4) == 4  # 15 cores are free: a 4-thread setting stays
    m.run(1.0, ours=1, others=20.0)  # more busy than cores: still one thread
    assert g.threads(16) == 1


def test_governor_stays_out_where_load_cannot_be_read():
    from cnnspec.kernels.cpu.threads import ThreadGovernor

    g = ThreadGovernor(cpus=[0, 1], busy=lambda: None)
    assert g.threads(2) == 2
    assert g.threads(2) == 2


def test_governed_sets_numba_threads_inside_and_restores_them(monkeypatch):
    import numba

    from cnnspec.kernels.cpu import threads

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs Numba with at least 2 threads")
    m = FakeMachine()
    monkeypatch.setattr(threads, "GOVERNOR", m.governor(cpus=2))
    monkeypatch.setenv("CNNSPEC_ADAPTIVE_THREADS", "1")
    saved = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        with threads.governed():
            assert numba.get_num_threads() == 2
        m.run(1.0, ours=1, others=1.0)
        with threads.governed():
            assert numba.get_num_threads() == 1
        assert numba.get_num_threads() == 2
        monkeypatch.setenv("CNNSPEC_ADAPTIVE_THREADS", "0")
        with threads.governed():
            assert numba.get_num_threads() == 2
    finally:
        numba.set_num_threads(saved)


def test_busy_seconds_reads_the_named_cpus():
    from cnnspec.machine_load import busy_seconds

    everything = busy_seconds()
    if everything is None:
        pytest.skip("no /proc/stat here")
    ours = busy_seconds(sorted(os.sched_getaffinity(0)))
    assert ours is not None and 0 <= ours <= everything + 1.0
    assert busy_seconds([10**6]) == 0.0  # no such CPU: nothing spent
