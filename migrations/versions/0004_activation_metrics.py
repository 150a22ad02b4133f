"""activation_metrics: per-site activation statistics (saturation, dead units, attention, gradient through time).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 07:40:00.000000

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'activation_metrics',
        sa.Column('job_id', sa.String(length=40), nullable=False),
        sa.Column('step', sa.Integer(), nullable=False),
        sa.Column('site', sa.String(length=200), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=20), nullable=False),
        sa.Column('mean', sa.Float(), nullable=True),
        sa.Column('std', sa.Float(), nullable=True),
        sa.Column('saturated_frac', sa.Float(), nullable=True),
        sa.Column('dead_frac', sa.Float(), nullable=True),
        sa.Column('attn_max_logit', sa.Float(), nullable=True),
        sa.Column('attn_entropy', sa.Float(), nullable=True),
        sa.Column('z_lse', sa.Float(), nullable=True),
        sa.Column('grad_time', sa.JSON(), nullable=True),
        sa.Column('grad_time_ratio', sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('job_id', 'step', 'site'),
    )
    with op.batch_alter_table('activation_metrics', schema=None) as batch_op:
        batch_op.create_index('ix_activation_metrics_job_step_position', ['job_id', 'step', 'position', 'site'],
                              unique=False)


def downgrade():
    with op.batch_alter_table('activation_metrics', schema=None) as batch_op:
        batch_op.drop_index('ix_activation_metrics_job_step_position')
    op.drop_table('activation_metrics')
