"""A Python VMM that drives /dev/kvm with bare ``fcntl.ioctl`` calls (no memslot import, so it
starts fast, even under ``strace -k``), making only the memslot calls plain strace decodes:
``KVM_CREATE_VM``, ``KVM_CHECK_EXTENSION`` and ``KVM_SET_USER_MEMORY_REGION`` (and one
``KVM_ENABLE_CAP``, which plain strace prints only as a pointer). Used by
tests/test_strace_options.py to make real strace logs with every output option.

    strace -f -o vmm.strace python examples/vmms/raw_ioctls.py
    memslot replay vmm.strace --backend both --profile detect

What it does, each with the result the kernel gives: two VMs; CREATE, an overlapping CREATE
(EEXIST), FLAGS_ONLY and DELETE; two threads MOVE-ing a slot each 20 times, concurrently (so
``-f`` logs split calls into ``<unfinished ...>`` / ``<... resumed>``); a forked child that
makes a VM of its own; a VM descriptor closed and its number reused by ``/dev/kvm``, then by a
new VM (what a log without the ``close`` lines must still tell apart); a vCPU.
"""

import contextlib
import ctypes
import fcntl
import mmap
import os
import struct
import threading

KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_ENABLE_CAP = 0x4068AEA3
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
LOG_DIRTY, READONLY = 1, 2
MIB = 1 << 20

ram = mmap.mmap(-1, 8 * MIB)
ua = ctypes.addressof(ctypes.c_char.from_buffer(ram))


def kvm_open() -> int:
    return os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)


def set_region(vm: int, slot: int, flags: int, gpa: int, size: int, offset: int = 0) -> None:
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION,
                struct.pack("<IIQQQ", slot, flags, gpa, size, ua + offset))


kvm = kvm_open()
vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
fcntl.ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY)
fcntl.ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS)
fcntl.ioctl(vm, KVM_ENABLE_CAP, struct.pack("<II4Q64x", KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0,
                                            1, 0, 0, 0))
kvm2 = kvm_open()
other = fcntl.ioctl(kvm2, KVM_CREATE_VM, 0)
set_region(vm, 0, LOG_DIRTY, 0, 2 * MIB)
set_region(other, 0, 0, MIB, MIB)
with contextlib.suppress(OSError):
    set_region(vm, 2, 0, 0x1000, 0x1000)  # inside slot 0: EEXIST
set_region(vm, 0, 0, 0, 2 * MIB)  # dirty logging off: FLAGS_ONLY


def mover(k: int) -> None:
    for i in range(20):
        set_region(vm, 10 + k, READONLY, (1 << 32) + (k << 28) + (i << 21), 2 * MIB, 4 * MIB)


threads = [threading.Thread(target=mover, args=(k,)) for k in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()

pid = os.fork()
if pid == 0:
    mine = fcntl.ioctl(kvm_open(), KVM_CREATE_VM, 0)
    set_region(mine, 3, 0, 0x300000, MIB)
    os._exit(0)
os.waitpid(pid, 0)

# The other VM's descriptor closed, reused by /dev/kvm, which makes a new VM.
os.close(other)
kvm3 = kvm_open()
assert kvm3 == other
newest = fcntl.ioctl(kvm3, KVM_CREATE_VM, 0)
set_region(newest, 0, 0, MIB, MIB)  # the closed VM's slot, made again in a new VM
fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
set_region(vm, 0, 0, 0, 0)  # DELETE
with contextlib.suppress(OSError):
    set_region(vm, 0, 0, 0, 0)  # DELETE of a slot that is not there: refused (EINVAL)
del ram
