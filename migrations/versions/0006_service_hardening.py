"""Service hardening: dataset file reference counts, strict idempotency keys, sample queue indexes.

- dataset_files: one row per stored content hash with the number of dataset rows using it (filled
  from the existing rows); uploads and deletes lock it, so a delete never removes a used file.
- jobs.idempotency_hash keeps the sha256 of the body that first used the job's Idempotency-Key (a
  column added in place: rebuilding jobs on SQLite would cascade-delete its metrics and events).
- samples: indexes for the per-key cap (owner, status), the fair pick (owner, started_at) and the
  queue (status, created_at).

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-03 08:00:00.000000

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

SAMPLE_INDEXES = (
    ('ix_samples_owner_status', ['owner_id', 'status']),
    ('ix_samples_owner_started', ['owner_id', 'started_at']),
    ('ix_samples_status_created', ['status', 'created_at']),
)


def upgrade():
    op.create_table('dataset_files',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('refs', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('sha256', name=op.f('pk_dataset_files'))
    )
    op.execute("INSERT INTO dataset_files (sha256, refs) SELECT sha256, count(*) FROM datasets GROUP BY sha256")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('idempotency_hash', sa.String(length=64), nullable=True))
    with op.batch_alter_table('samples', schema=None) as batch_op:
        for name, columns in SAMPLE_INDEXES:
            batch_op.create_index(name, columns, unique=False)


def downgrade():
    with op.batch_alter_table('samples', schema=None) as batch_op:
        for name, _columns in reversed(SAMPLE_INDEXES):
            batch_op.drop_index(name)
    if op.get_bind().dialect.name == 'sqlite':  # natively: a batch rebuild of jobs would cascade-delete its rows
        op.execute('ALTER TABLE jobs DROP COLUMN idempotency_hash')
    else:
        op.drop_column('jobs', 'idempotency_hash')
    op.drop_table('dataset_files')
