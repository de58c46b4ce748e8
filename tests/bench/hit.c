/* Baseline for the "hit per call" row: request_key(2) + keyctl_read on a cached key, in C.
 * usage: hit DESCRIPTION ITERATIONS   -> prints nanoseconds per call */
#include <keyutils.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
	char buf[32768];
	struct timespec t0, t1;
	long i, n;

	if (argc != 3)
		return 2;
	n = atol(argv[2]);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < n; i++) {
		key_serial_t key = request_key("user", argv[1], NULL, 0);
		if (key < 0 || keyctl_read(key, buf, sizeof(buf)) < 0) {
			perror("hit");
			return 1;
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%.1f\n", ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n);
	return 0;
}
