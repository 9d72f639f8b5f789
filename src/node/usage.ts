/** One line on stderr for a bad command line, as qemu-img does, and exit code 1. */
export function usageError(command: string, message: string, usage: string): number {
  console.error(`qcow86 ${command}: ${message}\n${usage}`);
  return 1;
}
