"""pyverbs end to end on the device: two RC QPs in one process connected to each other (rxe loops
back internally), registered MRs, one-sided RDMA WRITE and READ of 1 MiB, every byte checked.
This is the path the product's verbs data path takes, without the product."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

SIZE = 1 << 20
PORT = 1


@pytest.fixture
def verbs(rdma_device: str) -> Iterator[tuple[Any, Any, Any]]:
    from pyverbs.cq import CQ
    from pyverbs.device import Context
    from pyverbs.pd import PD

    with ExitStack() as stack:  # closes CQ, PD, context in reverse order, also on failure
        ctx = stack.enter_context(Context(name=rdma_device))
        pd = stack.enter_context(PD(ctx))
        cq = stack.enter_context(CQ(ctx, 16))
        yield ctx, pd, cq


def _connect(ctx: Any, pd: Any, cq: Any, gid_index: int) -> tuple[Any, Any]:
    import pyverbs.enums as e
    from pyverbs.addr import AHAttr, GlobalRoute
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr

    cap = QPCap(max_send_wr=4, max_recv_wr=4, max_send_sge=1, max_recv_sge=1)
    init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=1)
    qa, qb = QP(pd, init), QP(pd, init)
    gid = ctx.query_gid(PORT, gid_index)
    mtu = ctx.query_port(PORT).active_mtu
    for qp, peer, psn in ((qa, qb, 100), (qb, qa, 200)):
        attr = QPAttr()
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
        attr.path_mtu = mtu
        attr.dest_qp_num = peer.qp_num
        attr.rq_psn = 300 - psn  # the peer's sq_psn
        attr.sq_psn = psn
        attr.max_dest_rd_atomic = 1
        attr.max_rd_atomic = 1
        attr.min_rnr_timer = 12
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        attr.ah_attr = AHAttr(port_num=PORT, is_global=1, gr=GlobalRoute(dgid=gid, sgid_index=gid_index))
        qp.to_rts(attr)
    return qa, qb


def _one_sided(qp: Any, cq: Any, opcode: int, local: Any, remote: Any) -> None:
    import pyverbs.enums as e
    from pyverbs.wr import SGE, SendWR

    wr = SendWR(opcode=opcode, num_sge=1, sg=[SGE(local.buf, SIZE, local.lkey)])
    wr.set_wr_rdma(remote.rkey, remote.buf)
    qp.post_send(wr)
    deadline = time.monotonic() + 60
    while True:
        n, wcs = cq.poll()
        if n:
            assert wcs[0].status == e.IBV_WC_SUCCESS, f"work completion status {wcs[0].status}"
            return
        assert time.monotonic() < deadline, "no completion within 60 s"


def test_rc_loopback_write_and_read(verbs: tuple[Any, Any, Any], rdma_gid_index: int) -> None:
    import pyverbs.enums as e
    from pyverbs.mr import MR

    ctx, pd, cq = verbs
    access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
    with ExitStack() as stack:
        src, dst, back = (stack.enter_context(MR(pd, SIZE, access)) for _ in range(3))
        qa, qb = _connect(ctx, pd, cq, rdma_gid_index)
        stack.callback(qa.close)
        stack.callback(qb.close)
        payload = os.urandom(SIZE)
        src.write(payload, SIZE)

        _one_sided(qa, cq, e.IBV_WR_RDMA_WRITE, src, dst)  # qa pushes src into dst (qb's side)
        assert dst.read(SIZE, 0) == payload

        _one_sided(qb, cq, e.IBV_WR_RDMA_READ, back, src)  # qb pulls src into back
        assert back.read(SIZE, 0) == payload
