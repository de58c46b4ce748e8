/* The floor of the miss rows: the program a request-key rule runs that instantiates the key at
 * once, so that request_key(2) to payload costs the kernel, /sbin/request-key and one exec.
 * usage (on a request-key.conf line): instantiate %k */
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/keyctl.h>

int main(int argc, char **argv)
{
	if (argc != 2)
		return 2;
	long key = strtol(argv[1], NULL, 10);
	/* request-key assumed the authority already; assuming it again is harmless. */
	syscall(SYS_keyctl, KEYCTL_ASSUME_AUTHORITY, key);
	return syscall(SYS_keyctl, KEYCTL_INSTANTIATE, key, "floor", 5, 0) ? 1 : 0;
}
