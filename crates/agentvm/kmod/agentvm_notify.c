// SPDX-License-Identifier: GPL-2.0
/*
 * agentvm_notify: raises inotify/fanotify events on the guest's /work for
 * changes made on the host, which virtiofs does not report.
 *
 * The guest init writes one record per write(2) to /dev/agentvm-notify
 * (root only):
 *
 *   op flag path            op: M modify, C create, D delete, A all (rescan)
 *   R flag from NUL to      a rename, both paths under /work
 *
 * flag is 'd' for a directory, 'f' otherwise; paths are relative to /work,
 * made of non-empty components other than "." and "..", and are resolved
 * without crossing a symlink or a mount. The module never writes to a file
 * system: it drops the guest's cached names that are now wrong (so a later
 * stat sees the host's truth), refreshes attributes, and calls fsnotify.
 */
#include <linux/module.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/namei.h>
#include <linux/dcache.h>
#include <linux/fsnotify.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/capability.h>
#include <linux/uaccess.h>

#define NOTIFY_ROOT "/work"
/* Two paths of PATH_MAX plus op, flag and separator. */
#define MAX_RECORD (2 * PATH_MAX + 3)
#define WALK_FLAGS (LOOKUP_NO_SYMLINKS | LOOKUP_NO_XDEV | LOOKUP_BENEATH)

/* A path is relative, with no empty, "." or ".." component. */
static bool path_ok(const char *p, size_t len)
{
	size_t start = 0, i;

	if (len == 0 || len >= PATH_MAX || memchr(p, '\0', len))
		return false;
	for (i = 0; i <= len; i++) {
		if (i < len && p[i] != '/')
			continue;
		if (i == start)
			return false;
		if (i - start == 1 && p[start] == '.')
			return false;
		if (i - start == 2 && p[start] == '.' && p[start + 1] == '.')
			return false;
		start = i + 1;
	}
	return true;
}

/* The parent directory of `rel` under `root` and the last component. */
static int lookup_parent(const struct path *root, char *rel, struct path *parent,
			 struct qstr *name)
{
	char *slash = strrchr(rel, '/');
	int err;

	if (!slash) {
		*name = (struct qstr)QSTR_INIT(rel, strlen(rel));
		path_get(root);
		*parent = *root;
		return 0;
	}
	*slash = '\0';
	err = vfs_path_lookup(root->dentry, root->mnt, rel, WALK_FLAGS | LOOKUP_DIRECTORY, parent);
	*slash = '/';
	if (err)
		return err;
	*name = (struct qstr)QSTR_INIT(slash + 1, strlen(slash + 1));
	return 0;
}

/* Drops the guest's cached entry for `name` (positive or negative), so the
 * next lookup asks the host. Returns the inode it named, held, or NULL. */
static struct inode *forget_name(struct dentry *dir, struct qstr *name)
{
	struct dentry *child = d_hash_and_lookup(dir, name);
	struct inode *inode = NULL;

	if (IS_ERR_OR_NULL(child))
		return NULL;
	if (d_really_is_positive(child))
		inode = igrab(d_inode(child));
	d_invalidate(child);
	dput(child);
	return inode;
}

static void refresh_attrs(const struct path *path)
{
	struct kstat stat;

	vfs_getattr(path, &stat, STATX_BASIC_STATS, AT_STATX_FORCE_SYNC);
}

static void notify_name(struct path *parent, struct qstr *name, u32 mask, u32 cookie)
{
	struct inode *dir = d_inode(parent->dentry);

	fsnotify(mask, dir, FSNOTIFY_EVENT_INODE, dir, name, NULL, cookie);
}

static int raise_modify(const struct path *root, const char *rel, u32 isdir)
{
	struct path child;
	int err = vfs_path_lookup(root->dentry, root->mnt, rel, WALK_FLAGS, &child);

	if (err)
		return err;
	refresh_attrs(&child);
	fsnotify_dentry(child.dentry, FS_MODIFY | isdir);
	path_put(&child);
	return 0;
}

/* Create or delete of one name: the cached entry goes, the parent hears. */
static int raise_dirent(const struct path *root, char *rel, u32 mask)
{
	struct path parent;
	struct qstr name;
	struct inode *gone;
	int err = lookup_parent(root, rel, &parent, &name);

	if (err)
		return err;
	gone = forget_name(parent.dentry, &name);
	refresh_attrs(&parent);
	notify_name(&parent, &name, mask, 0);
	if (gone) {
		if (mask & FS_DELETE)
			fsnotify_inode(gone, FS_DELETE_SELF);
		iput(gone);
	}
	path_put(&parent);
	return 0;
}

static int raise_rename(const struct path *root, char *from, char *to, u32 isdir)
{
	struct path old_parent, new_parent;
	struct qstr old_name, new_name;
	struct inode *moved, *replaced;
	u32 cookie;
	int err = lookup_parent(root, from, &old_parent, &old_name);

	if (err)
		return err;
	err = lookup_parent(root, to, &new_parent, &new_name);
	if (err) {
		path_put(&old_parent);
		return err;
	}
	moved = forget_name(old_parent.dentry, &old_name);
	replaced = forget_name(new_parent.dentry, &new_name);
	refresh_attrs(&old_parent);
	refresh_attrs(&new_parent);
	cookie = fsnotify_get_cookie();
	notify_name(&old_parent, &old_name, FS_MOVED_FROM | isdir, cookie);
	notify_name(&new_parent, &new_name, FS_MOVED_TO | isdir, cookie);
	if (moved) {
		fsnotify_inode(moved, FS_MOVE_SELF);
		iput(moved);
	}
	if (replaced)
		iput(replaced);
	path_put(&new_parent);
	path_put(&old_parent);
	return 0;
}

static int raise_all(const struct path *root)
{
	refresh_attrs(root);
	fsnotify_inode(d_inode(root->dentry), FS_MODIFY);
	return 0;
}

static int raise_record(char *rec, size_t len)
{
	struct path root;
	char op, *path = rec + 2, *to;
	size_t path_len = len - 2;
	u32 isdir;
	int err;

	if (len < 2 || (rec[1] != 'd' && rec[1] != 'f'))
		return -EINVAL;
	op = rec[0];
	isdir = rec[1] == 'd' ? FS_ISDIR : 0;
	to = memchr(path, '\0', path_len);
	if (op == 'R') {
		if (!to || !path_ok(path, to - path) || !path_ok(to + 1, len - 2 - (to - path) - 1))
			return -EINVAL;
		to++;
	} else if (op == 'A') {
		if (path_len != 0)
			return -EINVAL;
	} else if (!path_ok(path, path_len)) {
		return -EINVAL;
	}
	err = kern_path(NOTIFY_ROOT, LOOKUP_FOLLOW | LOOKUP_DIRECTORY, &root);
	if (err)
		return err;
	switch (op) {
	case 'M':
		err = raise_modify(&root, path, isdir);
		break;
	case 'C':
		err = raise_dirent(&root, path, FS_CREATE | isdir);
		break;
	case 'D':
		err = raise_dirent(&root, path, FS_DELETE | isdir);
		break;
	case 'R':
		err = raise_rename(&root, path, to, isdir);
		break;
	case 'A':
		err = raise_all(&root);
		break;
	default:
		err = -EINVAL;
	}
	path_put(&root);
	return err;
}

static ssize_t notify_write(struct file *file, const char __user *buf, size_t len, loff_t *pos)
{
	char *rec;
	int err;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	if (len < 2 || len > MAX_RECORD)
		return -EINVAL;
	rec = memdup_user_nul(buf, len);
	if (IS_ERR(rec))
		return PTR_ERR(rec);
	err = raise_record(rec, len);
	kfree(rec);
	return err ? err : len;
}

static const struct file_operations notify_fops = {
	.owner = THIS_MODULE,
	.write = notify_write,
	.llseek = noop_llseek,
};

static struct miscdevice notify_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "agentvm-notify",
	.fops = &notify_fops,
	.mode = 0600,
};

module_misc_device(notify_dev);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("agentvm: inotify events on /work for changes made on the host");
