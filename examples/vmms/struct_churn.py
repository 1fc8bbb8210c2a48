"""A tiny Python VMM that makes, ROUNDS times, the calls strace does not decode itself
(KVM_CREATE_GUEST_MEMFD, a REGION2 CREATE bound to it, KVM_CLEAR_DIRTY_LOG, a REGION2 DELETE):
what ``memslot record`` must read from the tracee's memory. Used by tests/test_record.py and
bench/bench_record.py.

    python examples/vmms/struct_churn.py ROUNDS
"""

import ctypes
import mmap
import sys

from memslot import KvmVM
from memslot.constants import KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_MEM_GUEST_MEMFD

rounds = int(sys.argv[1])
ram = mmap.mmap(-1, 4 << 20)
ua = ctypes.addressof(ctypes.c_char.from_buffer(ram))
with KvmVM() as vm:
    vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 3)
    vm.set_user_memory_region(0, 1, 0, 2 << 20, ua)  # dirty-logged
    for i in range(rounds):
        fd = vm.create_guest_memfd(2 << 20)
        vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, 1 << 32, 2 << 20, ua, fd, 0)
        vm.clear_dirty_log(0, 64 * (i % 8), 64, bytes([i & 0xFF]) * 8)
        vm.set_user_memory_region2(1, 0, 0, 0, ua, 0, 0)  # DELETE
del ram
