"""jobs.parent_id and jobs.applied_patch: a retry's parent and the spec changes it applied.

Also an index on parent_id (GET /v1/jobs/{id} lists a job's children). Plain ADD/DROP COLUMN, no
batch mode: rebuilding `jobs` on SQLite would drop the old table, and with foreign keys enforced
that cascades into every job's metrics, events and checkpoints.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-03 07:40:00.000000

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0005'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    op.add_column('jobs', sa.Column('parent_id', sa.String(length=40), nullable=True))
    op.add_column('jobs', sa.Column('applied_patch', sa.JSON(), nullable=True))
    op.create_index('ix_jobs_parent_id', 'jobs', ['parent_id'], unique=False)


def downgrade():
    op.drop_index('ix_jobs_parent_id', table_name='jobs')
    op.drop_column('jobs', 'applied_patch')
    op.drop_column('jobs', 'parent_id')
