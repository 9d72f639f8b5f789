/**
 * A failure the disk Worker reports to the page with its kind (protocol.ts's ProblemKind), so the page can choose
 * what to offer: a message for a person, never a stack.
 */
import type { ProblemKind } from './protocol.js';

export class ProblemError extends Error {
  constructor(
    readonly kind: ProblemKind,
    message: string,
  ) {
    super(message);
  }
}
